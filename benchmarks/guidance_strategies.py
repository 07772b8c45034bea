"""Benchmark of guidance strategies: run a config through the pipeline, record metrics and speed.

    .venv/bin/python benchmarks/guidance_strategies.py            # the `cpu` comparison
    .venv/bin/python benchmarks/guidance_strategies.py --config quickstart --set run.dir=runs/bench-qs

Writes benchmarks/results/guidance_<config>.json and .md: per strategy the intervened-region and
off-target errors (evaluation segmentor and ground truth), image error against the true
counterfactual, composition, reversibility and realism; paired per-image differences between
strategies with 95 % intervals; per stage the wall time and the training throughput; and for how
many of the 9 interventions the paper's ordering (positional segmentor < regressor < none on the
intervened region) holds. With ``--paper-table
/work/shared/paper/table1.csv`` (not shipped) it also puts our error ratios beside the paper's.
Stages already complete in the run folder are skipped (their recorded times are reported), so
compare runs made from scratch.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from causalimg.config.loader import load_config
from causalimg.core.schema import VariableSchema
from causalimg.pipeline.components import SCHEMA_FILE
from causalimg.pipeline.evaluation import METRICS_FILE
from causalimg.pipeline.stage import DONE, atomic_write_json, atomic_write_text, read_json
from causalimg.pipeline.stages import run_pipeline
from causalimg.plugins.manager import load_registry
from causalimg.report.paired import paired_table, paper_order_findings
from causalimg.report.tables import PAPER_ORDER, ordering_count, paper_comparison, summary_table
from causalimg.training.accelerator import finish

RESULTS = Path(__file__).resolve().parent / "results"


def stage_rows(run_dir: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        done = read_json(run_dir / name / DONE) or {}
        summary = done.get("summary", {}) if isinstance(done.get("summary"), dict) else {}
        rows.append(
            {
                "stage": name,
                "seconds": done.get("seconds"),
                "steps": summary.get("steps"),
                "images_per_s": summary.get("images_per_s"),
                "steps_per_s": summary["steps"] / summary["session_time_s"]
                if summary.get("steps") and summary.get("session_time_s")
                else None,
            }
        )
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"# Guidance strategies: `{report['config']}`",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; stages took {report['stage_seconds']:.0f} s in all "
        f"(this invocation: {report['wall_s']:.0f} s; stages already complete were skipped).",
        "",
        summary_table(report["strategies"]).markdown(),
        "",
    ]
    for metric, count in report["paper_ordering"].items():
        if count is not None:
            lines.append(
                f"- {metric}: {' < '.join(PAPER_ORDER)} on the intervened region for {count} of 9 interventions."
            )
    if report["paired"]:
        lines += ["", paired_table(report["paired"]).markdown()]
        lines += [f"- {line}" for line in paper_order_findings(report["paired"])]
    if "paper_comparison" in report:
        lines += ["", report["paper_comparison"]]
    lines += ["", "| stage | seconds | steps | images/s | steps/s |", "|---|---:|---:|---:|---:|"]
    for row in report["stages"]:
        cells = [row["stage"]] + [
            "" if row[k] is None else f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k])
            for k in ("seconds", "steps", "images_per_s", "steps_per_s")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu", help="shipped config name or file (default: cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--paper-table", type=Path, default=None,
        help="the paper's Table 1 as CSV (intervention,cft_type,proximal,mid,distal) to compare orderings with",
    )  # fmt: skip
    args = parser.parse_args(argv)
    registry = load_registry()
    config = load_config(args.config, args.overrides, registry)
    began = time.perf_counter()
    results = run_pipeline(config, registry)
    wall = time.perf_counter() - began
    run_dir = Path(config.run.dir)
    labels = list(config.finetune.strategies)
    strategies = {label: read_json(run_dir / "evaluate" / label / METRICS_FILE)["metrics"] for label in labels}
    schema = VariableSchema.from_json((run_dir / "data" / SCHEMA_FILE).read_text())
    variables = schema.area_names
    report = {
        "config": Path(str(args.config)).stem,
        "command": " ".join(["python benchmarks/guidance_strategies.py", *sys.argv[1:]])
        if argv is None
        else " ".join(argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end, python {platform.python_version()}",
        "wall_s": wall,
        "stages": stage_rows(run_dir, list(results)),
        "stage_seconds": sum((read_json(run_dir / name / DONE) or {}).get("seconds", 0.0) for name in results),
        "strategies": strategies,
        "paired": (read_json(run_dir / "report" / "results.json") or {}).get("paired", []),
        "paper_ordering": {
            metric: ordering_count(
                {label: s[metric] for label, s in strategies.items() if "cells" in s.get(metric, {})}, variables
            )
            for metric in ("effectiveness", "ground-truth")
        },
    }
    if args.paper_table is not None:
        effectiveness = {label: s["effectiveness"] for label, s in strategies.items() if "effectiveness" in s}
        report["paper_comparison"] = paper_comparison(args.paper_table.read_text(), effectiveness, schema).markdown()
    name = report["config"]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"guidance_{name}.json", report)
    atomic_write_text(args.out / f"guidance_{name}.md", markdown(report))
    print(markdown(report))
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
