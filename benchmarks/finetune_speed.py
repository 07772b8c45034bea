"""Counterfactual fine-tuning throughput (steps/s) per guidance strategy on this machine's CPU.

One CFT step = factual nelbo + abduction + counterfactual decode + the strategy's frozen
predictors on x~ + backward + AdamW, exactly ``CounterfactualFineTuning`` as the pipeline runs it,
with the run config's default predictor sizes (U-Net segmentor, timm ResNet regressor) and the
image mechanism and preset named (the HVAE, or flow matching at its shipped solver settings, whose
abduction and prediction are differentiated through its solver steps, checkpointed by default). ``none`` times
the same step without guidance terms: what the guidance adds is the difference (No-CFT itself trains nothing: the pretrained DSCM is used as it is). ``pretrain`` times
a pretraining step of the same mechanism (its loss forward + backward + AdamW, as the pretrain
stage runs it): each strategy's step is also reported as a multiple of it. Steps of all rows are
interleaved and the median step time is reported; several mechanisms, precisions or checkpointing
settings named together are timed side by side in one run, their rows interleaved as well.

Usage:
  python benchmarks/finetune_speed.py                     # -> benchmarks/results/finetune_speed.{json,md}
  python benchmarks/finetune_speed.py --height 64 --steps 3 --mode bf16
  python benchmarks/finetune_speed.py --mechanism flow-matching --mode bf16   # -> finetune_speed_flow_matching.*
  python benchmarks/finetune_speed.py --mechanism hvae flow-matching --mode bf16   # -> finetune_speed_mechanisms.*
  python benchmarks/finetune_speed.py --mechanism flow-matching --height 16 --batch-size 16 \\
      --mode fp32 bf16 --checkpointing on off   # -> finetune_speed_flow_matching_settings.*
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from causalimg.builder import Builder
from causalimg.config.loader import load_config
from causalimg.config.sections import TrainConfig
from causalimg.core.guidance import GuidancePredictors
from causalimg.core.transform import VariableTransform
from causalimg.plugins.manager import load_registry
from causalimg.training.accelerator import tune_malloc
from causalimg.training.loop import make_adamw, to_channels_last

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hvae_speed import cpu_model

RESULTS = Path(__file__).parent / "results"
STRATEGIES = {
    "none": "[]",
    "regressor": "[{name: regressor}]",
    "segmentor": "[{name: segmentor}]",
    "positional-segmentor": "[{name: positional-segmentor}]",
}


def builder(args: argparse.Namespace, mechanism: str, checkpointing: str = "default") -> Builder:
    """The `cpu` run config at the benchmark's size, with every strategy: modules built as the pipeline builds them."""
    registry = load_registry()
    recompute = "" if checkpointing == "default" else f", checkpointing: {checkpointing == 'on'}"
    overrides = [
        f"data.spacing_mm={16.0 / args.height}",
        f"image_mechanism={{name: {mechanism}, preset: {args.preset}{recompute}}}",
        "finetune.strategies={" + ", ".join(f"{k}: {v}" for k, v in STRATEGIES.items()) + "}",
    ]
    return Builder(load_config("cpu", overrides, registry), registry)


def phantom_batch(build: Builder, n: int, root: Path) -> dict[str, torch.Tensor]:
    """n phantom training images rendered on the fly (no cache)."""
    data = build.config.data.model_copy(update={"cache": False, "n_train": n})
    source = build.registry.get("dataset", "phantom").factory(data, partitioner=build.partitioner(), root=root)
    return next(iter(DataLoader(source.split("train"), batch_size=n))), source


def build_step(label: str, build: Builder, data: dict, source, transform: VariableTransform, mode: str):
    """One strategy's CFT module and optimiser, as the finetune stage builds them; returns step()."""
    schema = source.schema
    torch.manual_seed(0)
    dscm = build.dscm(schema, source.image_shape, transform)
    predictors = GuidancePredictors(segmentor=build.segmentor(schema), regressor=build.regressor(schema))
    strategies = build.guidance(label, predictors)
    cft = build.finetuning(dscm, strategies, schema, float(source.spacing_mm) ** 2, eps=1.0)
    cft.train()
    if mode == "bf16":
        to_channels_last(cft.trainable)  # as the training loop does: what trains, and the batch
        data = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in data.items()}
    opt = make_adamw(cft.trainable, TrainConfig(lr=1e-4, betas=(0.9, 0.9), weight_decay=0.01))  # as the loop does

    def step() -> float:
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = cft(data)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cft.trainable, 350.0)
        opt.step()
        return time.perf_counter() - started

    return step, sum(p.numel() for p in dscm.image.parameters()) / 1e6


def build_pretrain_step(build: Builder, data: dict, source, transform: VariableTransform, mode: str):
    """A pretraining step of the same image mechanism on the same batch: its loss, backward, AdamW."""
    torch.manual_seed(0)
    hvae = build.image_mechanism(source.schema, source.image_shape)  # whichever mechanism is configured
    hvae.train()
    if mode == "bf16":
        hvae.to(memory_format=torch.channels_last)
    opt = make_adamw(list(hvae.parameters()), TrainConfig(lr=1e-4, betas=(0.9, 0.9), weight_decay=0.01))
    x = data["image"].contiguous(memory_format=torch.channels_last) if mode == "bf16" else data["image"]
    pa = transform.normalise(data["parents"])

    def step() -> float:
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = hvae.loss(x, pa)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hvae.parameters(), 350.0)
        opt.step()
        return time.perf_counter() - started

    return step, sum(p.numel() for p in hvae.parameters()) / 1e6


def measure(args: argparse.Namespace) -> list[dict]:
    """Steps of every mechanism, setting and strategy interleaved round-robin, so load from other work hits all alike."""
    torch.set_num_threads(args.threads)
    builds = {(m, ck): builder(args, m, ck) for m in args.mechanism for ck in args.checkpointing}
    with tempfile.TemporaryDirectory() as root:  # the data config is the same for every mechanism
        data, source = phantom_batch(next(iter(builds.values())), args.batch_size, Path(root))
    transform = VariableTransform.fit(source.schema.names, data["parents"])
    steps = {}  # (mechanism, precision, checkpointing, row) -> (step, image params M)
    for (mechanism, ck), build in builds.items():
        for mode in args.mode:
            steps[mechanism, mode, ck, "pretrain"] = build_pretrain_step(build, data, source, transform, mode)
            for label in STRATEGIES:
                steps[mechanism, mode, ck, label] = build_step(label, build, data, source, transform, mode)
    for step, _ in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[tuple[str, str, str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.steps):
        for key, (step, _) in steps.items():
            times[key].append(step())
    rows = []
    for (mechanism, mode, ck, label), seconds in times.items():
        median, pretrain = statistics.median(seconds), statistics.median(times[mechanism, mode, ck, "pretrain"])
        rows.append({
            "mechanism": mechanism, "mode": mode, "checkpointing": ck, "strategy": label, "steps_per_s": 1.0 / median,
            "images_per_s": args.batch_size / median, "s_per_step": median, "s_per_step_all": seconds,
            "image_params_M": steps[mechanism, mode, ck, label][1], "x_pretrain_step": median / pretrain,
        })  # fmt: skip
        print(f"{mechanism:14s} {mode:4s} {ck:7s} {label:22s} {1.0 / median:6.3f} steps/s  "
              f"{args.batch_size / median:6.1f} img/s  {median / pretrain:5.2f}x a pretraining step", flush=True)  # fmt: skip
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    setup = {
        "input": f"{args.height}x{6 * args.height}", "batch_size": args.batch_size, "mechanisms": args.mechanism,
        "preset": args.preset, "modes": args.mode, "checkpointing": args.checkpointing,
        "threads": args.threads, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "torch": torch.__version__, "machine": cpu_model(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min_at_end": os.getloadavg()[0],  # other work on the cores slows every row
    }  # fmt: skip
    several = len(args.mechanism) > 1
    settings = len(args.mode) * len(args.checkpointing) > 1  # precisions or checkpointing timed side by side
    suffix = (
        "_mechanisms" if several else "" if args.mechanism == ["hvae"] else "_" + args.mechanism[0].replace("-", "_")
    )
    stem = "finetune_speed" + suffix + ("_settings" if settings else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"setup": setup, "results": rows}, indent=2))
    step = {(r["mechanism"], r["mode"], r["checkpointing"], r["strategy"]): r["s_per_step"] for r in rows}
    first = (args.mode[0], args.checkpointing[0])  # the setting the others are compared with
    versus = several and "hvae" in args.mechanism  # each row also as a multiple of the HVAE's same row
    flags = f"--mode {' '.join(args.mode)}" + (
        "" if args.checkpointing == ["default"] else f" --checkpointing {' '.join(args.checkpointing)}"
    )
    lines = [
        "# Counterfactual fine-tuning throughput",
        "",
        f"`python benchmarks/finetune_speed.py --mechanism {' '.join(args.mechanism)} --preset {args.preset} "
        f"--height {args.height} --batch-size {args.batch_size} {flags} --steps {args.steps} --warmup {args.warmup}` "
        f"({setup['input']}, batch {args.batch_size}, {args.threads} threads, {setup['date']}, 1-min load average "
        f"{setup['load_average_1min_at_end']:.1f} at the end, {setup['machine']}). `pretrain` is a pretraining step "
        "of the same image mechanism; `none` is the CFT step without guidance terms; No-CFT itself trains nothing; "
        "checkpointing `default` is the mechanism's own setting.",
        "",
        "| mechanism | precision | checkpointing | step | steps/s | images/s | median s/step | x pretraining step "
        "| guidance overhead |"
        + (" x the HVAE's step |" if versus else "") + (f" speed-up over {first[0]}, {first[1]} |" if settings else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if versus else "") + ("---|" if settings else ""),
        *(f"| {r['mechanism']} | {r['mode']} | {r['checkpointing']} | {r['strategy']} | {r['steps_per_s']:.3f} | "
          f"{r['images_per_s']:.1f} | {r['s_per_step']:.2f} | {r['x_pretrain_step']:.2f} | "
          + ("" if r["strategy"] == "pretrain"
             else f"{(r['s_per_step'] / step[r['mechanism'], r['mode'], r['checkpointing'], 'none'] - 1) * 100:+.0f}%")
          + " |"
          + (f" {r['s_per_step'] / step['hvae', r['mode'], r['checkpointing'], r['strategy']]:.2f} |" if versus else "")
          + (f" {step[r['mechanism'], *first, r['strategy']] / r['s_per_step']:.2f}x |" if settings else "")
          for r in rows),
    ]  # fmt: skip
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=32, choices=(16, 32, 64), help="phantom image height (x6 wide)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--mechanism",
        nargs="+",
        choices=("hvae", "flow-matching"),
        default=["hvae"],
        help="image mechanisms; several are timed side by side",
    )
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32"],
        help="precisions; several are timed side by side",
    )
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        choices=("default", "on", "off"),
        default=["default"],
        help="the image mechanism's activation checkpointing; several are timed side by side",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    tune_malloc()
    write(measure(args), args)


if __name__ == "__main__":
    main()
