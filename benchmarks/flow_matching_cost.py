"""Cost of one counterfactual: flow matching at its shipped solver settings against the HVAE, per preset.

For each preset and input size, untrained networks (cost does not depend on weights): parameters,
GFLOP per image of one velocity evaluation, of one counterfactual (abduction + prediction), and of
the counterfactual with its gradient as fine-tuning computes it (HVAE: abduction and prediction
differentiated; flow matching: abduction and prediction differentiated through checkpointed
solver steps, whose recomputation is counted), all counted by
``torch.utils.flop_counter``; and, where ``--time`` names the preset, counterfactuals per second on
this machine (batch 16, no gradients).

Usage:
  python benchmarks/flow_matching_cost.py          # -> benchmarks/results/flow_matching_cost.{json,md}
  python benchmarks/flow_matching_cost.py --time cpu paper --threads 2
  python benchmarks/flow_matching_cost.py --runs cpu:16x96 cpu:32x192 paper:32x192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from causalimg.mechanisms.flow_matching import FlowMatching, FlowMatchingConfig
from causalimg.mechanisms.hvae import HVAE, HVAEConfig
from causalimg.training.accelerator import tune_malloc

RESULTS = Path(__file__).parent / "results"
RUNS = [("cpu", (16, 96)), ("cpu", (32, 192)), ("paper", (32, 192)), ("paper", (64, 384))]
PARENTS = 9


def gflop_per_image(fn, batch: int) -> float:
    """GFLOP of fn() divided by the batch (autograd on: the counter's module tracker needs grad_fns)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch / 1e9


def counterfactuals_per_s(model, x: torch.Tensor, pa: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        model.predict(model.abduct(x, pa), -pa)  # warm-up
        start = time.time()
        for _ in range(repeats):
            model.predict(model.abduct(x, pa), -pa)
    return repeats * x.shape[0] / (time.time() - start)


def measure(preset: str, shape: tuple[int, int], timed: bool) -> list[dict]:
    torch.manual_seed(0)
    x, pa = torch.rand(2, 1, *shape) * 2 - 1, torch.rand(2, PARENTS) * 2 - 1
    flow = FlowMatching.from_config(FlowMatchingConfig(preset=preset), image_shape=shape, num_parents=PARENTS)
    hvae = HVAE.from_config(HVAEConfig(preset=preset, dropout=0.0), image_shape=shape, num_parents=PARENTS)
    rows = []
    for name, model in (("flow-matching", flow), ("hvae", hvae)):
        model.eval()

        def counterfactual(model=model):  # gradients recorded, never computed: the same forward FLOPs
            return model.predict(model.abduct(x, pa), -pa)

        def with_gradient(model=model):
            model.predict(model.abduct(x, pa), -pa).square().mean().backward()

        row = {
            "mechanism": name, "preset": preset, "input": f"{shape[0]}x{shape[1]}",
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflop_counterfactual": gflop_per_image(counterfactual, 2),
            "gflop_counterfactual_with_gradient": gflop_per_image(with_gradient, 2),
        }  # fmt: skip
        if name == "flow-matching":
            row["gflop_velocity_evaluation"] = gflop_per_image(lambda m=model: m.velocity(x, torch.zeros(2), pa), 2)
            row["evaluations_per_counterfactual"] = model.evaluations_per_counterfactual
            row["settings"] = (f"{model.solver}, {model.steps} steps, grid power {model.grid_power:g}, "
                               f"{model.abduction_iterations} abduction iterations")  # fmt: skip
        if timed:
            xb, pb = torch.rand(16, 1, *shape) * 2 - 1, torch.rand(16, PARENTS) * 2 - 1
            row["counterfactuals_per_s"] = counterfactuals_per_s(model, xb, pb)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def cell(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


def write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    setup = {
        "threads": args.threads, "timed_presets": args.time, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min_at_end": os.getloadavg()[0],
    }  # fmt: skip
    (RESULTS / "flow_matching_cost.json").write_text(json.dumps({"setup": setup, "results": rows}, indent=2))
    settings = next(r["settings"] for r in rows if "settings" in r)
    lines = [
        "# Cost of one counterfactual: flow matching vs HVAE",
        "",
        f"`python benchmarks/flow_matching_cost.py` ({setup['date']}; flow matching at its shipped settings: "
        f"{settings}). GFLOP per image. 'with gradient' is the counterfactual as fine-tuning differentiates it "
        "(flow matching: abduction and prediction through checkpointed solver steps, "
        f"recomputation included). Counterfactuals/s: batch 16, no gradients, {args.threads} threads, 1-min load "
        f"average {setup['load_average_1min_at_end']:.1f} at the end.",
        "",
        "| mechanism | preset | input | params (M) | GFLOP / velocity evaluation | GFLOP / counterfactual | "
        "GFLOP / counterfactual with gradient | counterfactuals/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *(f"| {r['mechanism']} | {r['preset']} | {r['input']} | {r['params_M']:.2f} | "
          f"{cell(r, 'gflop_velocity_evaluation', 2)} | {r['gflop_counterfactual']:.2f} | "
          f"{r['gflop_counterfactual_with_gradient']:.2f} | {cell(r, 'counterfactuals_per_s', 1)} |" for r in rows),
    ]  # fmt: skip
    (RESULTS / "flow_matching_cost.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time", nargs="*", default=["cpu"], help="presets whose counterfactuals/s are timed")
    every = [f"{preset}:{h}x{w}" for preset, (h, w) in RUNS]
    parser.add_argument("--runs", nargs="*", choices=every, default=every,
                        help="preset:size pairs to measure (counting the gradient of paper:64x384 takes > 24 GB)")  # fmt: skip
    args = parser.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    runs = [(preset, shape) for preset, shape in RUNS if f"{preset}:{shape[0]}x{shape[1]}" in args.runs]
    rows = [row for preset, shape in runs for row in measure(preset, shape, preset in args.time)]
    write(rows, args)


if __name__ == "__main__":
    main()
