"""When does positional guidance matter? Pos-Seg-CFT against Reg-CFT as the phantom's confounds grow.

    python benchmarks/confound_sweep.py --config cpu-confounded --strengths 0 0.5 1 --set run.dir=runs/sweep

For each strength s the config runs with every confound loading scaled by s (0: the clean phantom,
the control; 1: the config's own loadings), in ``<run.dir>/strength-<s>``. From each run's
per-image rows it reports, paired over the same test images and targets, the difference of the
first two strategies of ``report.ordering`` (by default positional-segmentor minus regressor):
the intervened-region and off-target errors by the evaluation segmentor and against the true
counterfactual, and the image MAE outside the intervened region against the true counterfactual,
each with its 95 % interval (negative: positional guidance errs less). Writes
benchmarks/results/<name>.json, .md and .png, with the wall time of every strength.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from causalimg.builder import load_schema
from causalimg.config.loader import load_config
from causalimg.io import atomic_write_json, atomic_write_text, load_tensors
from causalimg.metrics.base import mean_ci, per_image_errors
from causalimg.pipeline.graph import run_pipeline
from causalimg.pipeline.stages.evaluate import ROWS_FILE
from causalimg.plugins.manager import load_registry
from causalimg.training.accelerator import finish

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = (("effectiveness/abs_error", "evaluation segmentor"), ("ground-truth/area_error", "true counterfactual"))


def paired(run_dir: Path, first: str, second: str) -> dict[str, dict[str, float]]:
    """first minus second, per image, for each headline error; mean and 95 % interval."""
    schema = load_schema(run_dir / "data")
    a, b = (load_tensors(run_dir / "evaluate" / label / ROWS_FILE) for label in (first, second))
    assert torch.equal(a["index"], b["index"]), "both strategies are evaluated on the same images in the same order"
    out = {}
    for key, source in SOURCES:
        if key not in a:
            continue
        ea, eb = per_image_errors(a[key], schema), per_image_errors(b[key], schema)  # type: ignore[arg-type]
        for quantity in ("intervened", "off_target"):
            out[f"{quantity.replace('_', '-')} ({source})"] = mean_ci(ea[quantity] - eb[quantity])
    if "ground-truth/mae_out" in a:
        mae_a, mae_b = a["ground-truth/mae_out"].nanmean(1), b["ground-truth/mae_out"].nanmean(1)  # type: ignore[union-attr]
        out["image MAE outside (true counterfactual)"] = mean_ci(mae_a - mae_b)
    return out


def plot(rows: list[dict], path: Path, first: str, second: str) -> None:
    names = list(rows[0]["paired"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    strengths = [r["strength"] for r in rows]
    for ax, name in zip(axes[0], names):
        means = [r["paired"][name]["mean"] for r in rows]
        cis = [r["paired"][name]["ci95"] for r in rows]
        ax.errorbar(strengths, means, yerr=cis, marker="o", capsize=3)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("confound strength (x preset loadings)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel(f"{first} - {second}\n(negative: {first} better)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    first, second = report["compared"]
    names = list(report["rows"][0]["paired"])
    lines = [
        f"# Confound sweep: `{report['config']}`, {first} - {second}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}. Paired over the same test images and targets; 95 % intervals; "
        f"negative: {first} errs less.",
        "",
        "| strength | loadings | " + " | ".join(names) + " | stages (s) |",
        "|---:|---|" + "---:|" * len(names) + "---:|",
    ]
    for r in report["rows"]:
        cells = [f"{r['paired'][n]['mean']:+.2f} ± {r['paired'][n]['ci95']:.2f}" for n in names]
        loadings = ", ".join(f"{k} {v:g}" for k, v in r["loadings"].items()) or "clean"
        lines.append(f"| {r['strength']:g} | {loadings} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-confounded")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="confound_sweep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    registry = load_registry()
    base = load_config(args.config, args.overrides, registry)
    preset = base.data.confounds.model_dump()  # type: ignore[attr-defined]
    first, second = base.report.ordering[0], base.report.ordering[1]
    rows = []
    for strength in args.strengths:
        loadings = {k: min(round(v * strength, 6), 0.99) for k, v in preset.items() if v * strength > 0}
        run_dir = Path(base.run.dir) / f"strength-{strength:g}"
        sets = [*args.overrides, f"run.dir={run_dir}", f"data.confounds={loadings or {}}"]
        config = load_config(args.config, sets, registry)
        began = time.perf_counter()
        run_pipeline(config, registry)
        seconds = time.perf_counter() - began
        rows.append({"strength": strength, "loadings": loadings, "seconds": seconds,
                     "paired": paired(run_dir, first, second)})  # fmt: skip
        print(f"strength {strength:g}: {rows[-1]['paired']}", flush=True)
    command = " ".join(["python benchmarks/confound_sweep.py", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "config": args.config,
        "command": command,
        "compared": [first, second],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", report)
    atomic_write_text(args.out / f"{args.name}.md", markdown(report))
    plot(rows, args.out / f"{args.name}.png", first, second)
    print(markdown(report))
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
