"""Null-counterfactual error and cost of the flow-matching mechanism on the phantom, per solver setting.

Trains the flow-matching preset on the phantom (AdamW, linear warm-up, EMA weights; or loads
``--weights`` saved by an earlier run), then measures on the test split, for every solver, step count
and number of abduction refinements, the null counterfactual x~ = predict(abduct(x, pa), pa): mean
and max |x~ - x| in 0-255 units, velocity-network evaluations and GFLOP per counterfactual, and
seconds per counterfactual. The HVAE preset of the same size is costed alike (one abduction + one
prediction, GFLOP counted by ``torch.utils.flop_counter``), untrained: its cost does not depend on
its weights, and its null counterfactual is exact by construction.

Usage:
  python benchmarks/flow_matching_abduction.py      # -> benchmarks/results/flow_matching_abduction.{json,md}
  python benchmarks/flow_matching_abduction.py --weights /tmp/fm/weights.safetensors   # skip training
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from causalimg.core.transform import VariableTransform
from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.mechanisms.flow_matching import EVALUATIONS, FlowMatching, FlowMatchingConfig
from causalimg.mechanisms.hvae import HVAE, HVAEConfig
from causalimg.regions.axial import AxialPartitioner
from causalimg.training.accelerator import tune_malloc

RESULTS = Path(__file__).parent / "results"
PIXEL_255 = 127.5  # [-1, 1] -> 0-255 units


def train(model: FlowMatching, source: PhantomSource, transform: VariableTransform, args) -> list[float]:
    """AdamW with linear warm-up; the model ends holding the EMA weights. Returns the loss every 100 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = copy.deepcopy(model).requires_grad_(False)
    loader = DataLoader(source.split("train"), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    history, running, start = [], 0.0, time.time()
    model.train()
    for step in range(args.steps):
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = model.loss(batch["image"], transform.normalise(batch["parents"]))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - args.ema)
        running += float(loss.detach())
        if (step + 1) % 100 == 0:
            history.append(running / 100)
            rate = (step + 1) * args.batch_size / (time.time() - start)
            print(f"step {step + 1}: loss {running / 100:.4f} ({rate:.1f} img/s)", flush=True)
            running = 0.0
    model.load_state_dict(ema.state_dict())
    return history


def gflop(fn) -> float:
    """Forward GFLOP of fn() (run with autograd on: the counter's module tracker needs grad_fns)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def measure(model: FlowMatching, x: torch.Tensor, pa: torch.Tensor, args) -> list[dict]:
    """Null counterfactual error per (solver, steps, abduction iterations) on the given test images."""
    rows = []
    per_eval = gflop(lambda: model.velocity(x[:1], torch.zeros(1), pa[:1]))
    settings = itertools.product(args.grid_powers, args.solvers, args.step_counts, args.iterations)
    for power, solver, steps, iterations in settings:
        model.grid_power, model.solver, model.steps, model.abduction_iterations = power, solver, steps, iterations
        start = time.time()
        errors = []
        for i in range(0, x.shape[0], 64):
            xb, pb = x[i : i + 64], pa[i : i + 64]
            errors.append((model.predict(model.abduct(xb, pb), pb) - xb).abs().flatten(1) * PIXEL_255)
        seconds = (time.time() - start) / x.shape[0]
        error = torch.cat(errors)  # (N, H * W) in 0-255 units
        evaluations = model.evaluations_per_counterfactual
        row = {
            "grid_power": power, "solver": solver, "steps": steps, "abduction_iterations": iterations, "evaluations": evaluations,
            "gflop": evaluations * per_eval, "mean_l1_255": float(error.mean()),
            "worst_image_l1_255": float(error.mean(1).max()), "max_pixel_255": float(error.max()),
            "ms_per_counterfactual": 1000 * seconds,
        }  # fmt: skip
        rows.append(row)
        print(f"p {power:g} {solver:8s} steps {steps:3d} iter {iterations}: mean L1 {row['mean_l1_255']:.3f} "
              f"worst image {row['worst_image_l1_255']:.3f} max px {row['max_pixel_255']:.2f} "
              f"({evaluations} evals, {row['ms_per_counterfactual']:.1f} ms)", flush=True)  # fmt: skip
    return rows


@torch.no_grad()
def hvae_cost(shape: tuple[int, int], num_parents: int, x: torch.Tensor, pa: torch.Tensor) -> dict:
    hvae = HVAE.from_config(HVAEConfig(dropout=0.0), image_shape=shape, num_parents=num_parents).eval()

    def counterfactual(xb, pb):
        return hvae.predict(hvae.abduct(xb, pb), pb)

    flops = gflop(lambda: counterfactual(x[:1], pa[:1]))
    start = time.time()
    for i in range(0, x.shape[0], 64):
        counterfactual(x[i : i + 64], pa[i : i + 64])
    ms = 1000 * (time.time() - start) / x.shape[0]
    return {"gflop": flops, "ms_per_counterfactual": ms, "params_M": sum(p.numel() for p in hvae.parameters()) / 1e6}


def shipped(row: dict) -> bool:
    """Whether a row measures the solver settings that ``FlowMatchingConfig`` ships."""
    config = FlowMatchingConfig()
    return all(row[k] == getattr(config, k) for k in ("grid_power", "solver", "steps", "abduction_iterations"))


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = "flow_matching_abduction" + ("_bf16" if result["setup"]["bf16"] else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    s, hvae = result["setup"], result["hvae"]
    train = s["training"]
    lines = [
        "# Flow matching: null-counterfactual error and cost",
        "",
        f"`{s['command']}`: preset {s['preset']} ({s['params_M']:.2f} M parameters) trained "
        f"{train['steps']} steps of batch {train['batch_size']} on the phantom at {s['input']} ({s['n_train']} "
        f"training images; final loss {train['loss_every_100_steps'][-1]:.4f}; {train['seconds']:.0f} s; "
        f"`{train['command']}`); errors over {s['n_test']} test images, |x~ - x| in 0-255 "
        f"units{', velocity network under bf16 autocast' * s['bf16']}. {s['threads']} threads, {s['date']}, 1-min load average {s['load_average_1min_at_end']:.1f} at the "
        "end (ms depend on the machine's load; evaluations and GFLOP do not).",
        "",
        "| grid power | solver | steps | abduction iterations | network evaluations | GFLOP | mean L1 | "
        "worst image L1 | max pixel | ms / counterfactual |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['grid_power']:g} | {r['solver']}{' (shipped)' * shipped(r)} | {r['steps']} | {r['abduction_iterations']} | {r['evaluations']} | {r['gflop']:.2f} | "
          f"{r['mean_l1_255']:.3f} | {r['worst_image_l1_255']:.3f} | {r['max_pixel_255']:.2f} | "
          f"{r['ms_per_counterfactual']:.1f} |" for r in result["rows"]),
        "",
        f"HVAE `cpu` preset at the same size ({hvae['params_M']:.2f} M parameters): one abduction + one "
        f"prediction = {hvae['gflop']:.2f} GFLOP, {hvae['ms_per_counterfactual']:.1f} ms per counterfactual; "
        "its null counterfactual is exact (pixel noise abducted in closed form).",
    ]  # fmt: skip
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=1.0, help="phantom pixel size, mm (1.0: 16 x 96)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=1, help="1 is faster than 2 on a busy machine")
    parser.add_argument("--data-root", type=Path, default=Path("/tmp/causalimg-bench-data"))
    parser.add_argument(
        "--weights", type=Path, help="load these weights (and the .json beside them) instead of training"
    )
    parser.add_argument("--save", type=Path, default=Path("/tmp/causalimg-fm-bench/weights.safetensors"))
    parser.add_argument("--solvers", nargs="+", default=list(EVALUATIONS))
    parser.add_argument("--step-counts", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--iterations", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--bf16", action="store_true", help="measure under bf16 autocast (-> *_bf16.{json,md})")
    parser.add_argument("--grid-powers", nargs="+", type=float, default=[1.0, 2.0])
    args = parser.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = PhantomSource(
        PhantomConfig(spacing_mm=args.spacing, n_train=args.n_train, n_val=8, n_test=args.n_test),
        AxialPartitioner(),
        args.data_root,
    )
    train_parents = torch.cat([b["parents"] for b in DataLoader(source.split("train"), batch_size=512)])
    transform = VariableTransform.fit(tuple(source.variables), train_parents)
    shape, num_parents = tuple(source.image_shape), len(source.variables)
    model = FlowMatching.from_config(FlowMatchingConfig(preset=args.preset), image_shape=shape,
                                     num_parents=num_parents)  # fmt: skip
    start = time.time()
    if args.weights:  # with the training record that the run which trained them wrote beside them
        model.load_state_dict(load_file(str(args.weights)))
        training = json.loads(args.weights.with_suffix(".json").read_text())
    else:
        history = train(model, source, transform, args)
        training = {
            "command": " ".join(["python benchmarks/flow_matching_abduction.py", *sys.argv[1:]]),
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
            "seconds": time.time() - start, "loss_every_100_steps": history,
        }  # fmt: skip
        args.save.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.save))
        args.save.with_suffix(".json").write_text(json.dumps(training, indent=2))
    model.eval()
    test = next(iter(DataLoader(source.split("test"), batch_size=args.n_test)))
    x, pa = test["image"], transform.normalise(test["parents"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        rows = measure(model, x, pa, args)
    command = " ".join(["python benchmarks/flow_matching_abduction.py", *sys.argv[1:]])
    setup = {
        "command": command, "preset": args.preset, "input": f"{shape[0]}x{shape[1]}", "n_train": args.n_train,
        "n_test": args.n_test, "training": training, "bf16": args.bf16,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_1min_at_end": os.getloadavg()[0],
    }  # fmt: skip
    write({"setup": setup, "rows": rows, "hvae": hvae_cost(shape, num_parents, x, pa)})


if __name__ == "__main__":
    main()
