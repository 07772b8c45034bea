"""Augmentation export throughput: counterfactuals written with their masks per second (``causalimg augment``).

Builds a run with the `cpu` config's architecture (32 x 192 phantom, `cpu` HVAE preset, the `cpu`
segmentor) through the normal pipeline with two optimisation steps per network: throughput does
not depend on the weights' values. Then times ``api.augment.augment``, the body of ``causalimg
augment``, on the run's training split: reading the images, one abduction per image, one prediction
and one evaluation-segmentor pass per counterfactual, every ``.npz`` written with its soft mask and
provenance and fsynced, the chunk records and the provenance table. Model loading is not timed.

Each precision is timed ``--repeats`` times, interleaved, into fresh folders; wall time and the
process's CPU time are both reported, because on a shared machine the wall time measures the load
as much as the code (counterfactuals per CPU-second x cores is what an idle machine would reach,
less what threads lose to each other).

Usage:
  python benchmarks/augment_speed.py                      # -> benchmarks/results/augment_speed.{json,md}
  python benchmarks/augment_speed.py --images 128 --interventions 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from causalimg.api.augment import augment, read_spec
from causalimg.api.model import CounterfactualModel
from causalimg.config.sections import TrainConfig
from causalimg.training.accelerator import make_accelerator, tune_malloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hvae_speed import cpu_model

RESULTS = Path(__file__).parent / "results"
INTERVENTIONS = ("cpa_mid=U", "ncpa_proximal=U", "la_distal=+U(-5,5)", "cpa_distal=U", "ncpa_mid=+U(-3,3)", "la_mid=U")
SHORT = "{steps: 2, batch_size: 8, warmup_steps: 1, checkpoint_every: 2}"


def build_run(run_dir: Path, images: int) -> None:
    """The `cpu` config's architecture, trained for two steps per network by ``python -m causalimg.run``
    (stages already complete are skipped)."""
    overrides = [
        f"run.dir={run_dir}",
        f"data.n_train={images}",
        "data.n_val=16",
        "data.n_test=16",
        f"flows_train={SHORT}",
        f"predictors.segmentor.train={SHORT}",
        f"predictors.regressor.train={SHORT}",
        f"pretrain={SHORT}",
        f"finetune.train={SHORT}",
        "finetune.strategies={positional-segmentor: [{name: positional-segmentor, gradient_temperature: 4.0}]}",
        "evaluate.num_images=8",
        "evaluate.batch_size=8",
        "evaluate.metrics=[{name: effectiveness}]",
    ]
    argv = [sys.executable, "-m", "causalimg.run", "--config", "cpu", *(a for o in overrides for a in ("--set", o))]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def time_augment(model: CounterfactualModel, out: Path, args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(TrainConfig(), out)
    interventions = read_spec(list(INTERVENTIONS[: args.interventions]), model.names)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = augment(model, "train", interventions, out, accelerator=accelerator, policy="clamp",
                      batch_size=args.batch_size, limit=args.images, progress=False)  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    written = summary["written"]
    return {"written": written, "wall_s": wall, "cpu_s": cpu, "per_s": written / wall, "per_cpu_s": written / cpu}


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    started = time.perf_counter()
    build_run(run_dir, args.images)
    build_s = time.perf_counter() - started
    models = {p: CounterfactualModel.from_pretrained(run_dir, precision=p) for p in args.precisions}
    load_before = os.getloadavg()
    rows: dict[str, list[dict]] = {p: [] for p in args.precisions}
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for repeat in range(args.repeats):
            for precision, model in models.items():
                row = time_augment(model, Path(scratch) / f"{precision}-{repeat}", args)
                rows[precision].append(row)
                print(f"{precision} #{repeat}: {row['written']} in {row['wall_s']:.1f} s: {row['per_s']:.1f}/s wall, "
                      f"{row['per_cpu_s']:.1f} per CPU-second, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return {
        "setup": {
            "input": "32x192 (phantom, 0.5 mm)", "hvae_preset": "cpu", "segmentor_widths": [16, 32, 64, 128],
            "images": args.images, "interventions_per_image": args.interventions,
            "interventions": list(INTERVENTIONS[: args.interventions]), "batch_size": args.batch_size,
            "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "machine": cpu_model(),
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "run_build_s": build_s,
        },
        "results": {
            p: {"median_per_s": statistics.median(r["per_s"] for r in runs),
                "best_per_s": max(r["per_s"] for r in runs),
                "median_per_cpu_s": statistics.median(r["per_cpu_s"] for r in runs), "runs": runs}
            for p, runs in rows.items()
        },
    }  # fmt: skip


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "augment_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["setup"]
    lines = [
        "# Augmentation export throughput",
        "",
        f"`python benchmarks/augment_speed.py` ({s['input']}, `cpu` HVAE preset, {s['images']} source images x "
        f"{s['interventions_per_image']} interventions, chunks of {s['batch_size']}, {s['threads']} threads, "
        f"{s['repeats']} runs per precision, {s['date']}, {s['machine']}, {s['cores']} cores). Counterfactuals "
        "written with their soft masks, metadata and provenance, each file fsynced. 1-minute load average "
        f"{s['load_average_before'][0]:.1f} before and {s['load_average_after'][0]:.1f} after: the machine was "
        "shared, so the wall-clock rate is what this process got of it; per CPU-second is the code's own rate.",
        "",
        "| precision | counterfactuals/s (median) | best | per CPU-second (median) | x cores |",
        "|---|---:|---:|---:|---:|",
        *(f"| {p} | {r['median_per_s']:.1f} | {r['best_per_s']:.1f} | {r['median_per_cpu_s']:.1f} | "
          f"{r['median_per_cpu_s'] * min(s['threads'], s['cores']):.1f} |" for p, r in result["results"].items()),
    ]  # fmt: skip
    (RESULTS / "augment_speed.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="source images of the training split")
    parser.add_argument("--interventions", type=int, default=4, choices=range(1, len(INTERVENTIONS) + 1))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--run-dir", default=str(Path(tempfile.gettempdir()) / "causalimg-augment-speed"),
                        help="where the cpu-architecture run is built (reused when complete)")  # fmt: skip
    parser.add_argument("--scratch", default=None, help="folder for the timed exports (default: the temp folder)")
    args = parser.parse_args()
    tune_malloc()
    write(measure(args))


if __name__ == "__main__":
    main()
