"""Benchmark of guidance strategies: run a config through the pipeline, record metrics and speed.

    .venv/bin/python benchmarks/guidance_strategies.py            # the `cpu` comparison
    .venv/bin/python benchmarks/guidance_strategies.py --config quickstart --set run.dir=runs/bench-qs

Writes benchmarks/results/guidance_<config>.json and .md: the report's summary table (every
metric's headline numbers per strategy), the per-intervention ordering counts and the paired
per-image differences between strategies with 95 % intervals, the paper's Table 1 ratios beside
this run's (the paper's table ships with causalimg), and per stage the wall time and the training
throughput. Stages already complete in the run folder are skipped (their recorded times are
reported), so compare runs made from scratch.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from causalimg.builder import load_schema
from causalimg.config.loader import load_config
from causalimg.io import atomic_write_json, atomic_write_text, read_json
from causalimg.pipeline.graph import run_pipeline
from causalimg.pipeline.stage import DONE
from causalimg.plugins.manager import load_registry
from causalimg.report.paper import paper_comparison
from causalimg.training.accelerator import finish

RESULTS = Path(__file__).resolve().parent / "results"


def stage_rows(run_dir: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        done = read_json(run_dir / name / DONE) or {}
        summary = done.get("summary", {}) if isinstance(done.get("summary"), dict) else {}
        steps, seconds = summary.get("steps"), summary.get("session_time_s")
        rows.append({
            "stage": name,
            "seconds": done.get("seconds"),
            "steps": steps,
            "images_per_s": summary.get("images_per_s"),
            "steps_per_s": steps / seconds if steps and seconds else None,
        })  # fmt: skip
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"# Guidance strategies: `{report['config']}`",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; stages took {report['stage_seconds']:.0f} s in all "
        f"(this invocation: {report['wall_s']:.0f} s; stages already complete were skipped).",
        "",
        report["summary_md"],
        "",
        *(f"- {line}" for line in report["findings"]),
        "",
        report["paired_md"],
        "",
        report["paper_comparison"],
        "",
        "| stage | seconds | steps | images/s | steps/s |",
        "|---|---:|---:|---:|---:|",
    ]
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
    parser.add_argument("--name", default=None, help="results file stem (default: guidance_<config>)")
    args = parser.parse_args(argv)
    registry = load_registry()
    config = load_config(args.config, args.overrides, registry)
    began = time.perf_counter()
    results = run_pipeline(config, registry)
    wall = time.perf_counter() - began
    run_dir = Path(config.run.dir)
    report_dir = run_dir / "report"
    report_json = read_json(report_dir / "results.json") or {}
    strategies = report_json.get("strategies", {})
    effectiveness = {label: s["effectiveness"] for label, s in strategies.items() if "effectiveness" in s}
    command = " ".join(["python benchmarks/guidance_strategies.py", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "config": Path(str(args.config)).stem,
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end, python {platform.python_version()}",
        "wall_s": wall,
        "stages": stage_rows(run_dir, list(results)),
        "stage_seconds": sum((read_json(run_dir / name / DONE) or {}).get("seconds", 0.0) for name in results),
        "strategies": strategies,
        "paired": report_json.get("paired", []),
        "findings": report_json.get("findings", []),
        "summary_md": (report_dir / "summary.md").read_text() if (report_dir / "summary.md").is_file() else "",
        "paired_md": (report_dir / "paired.md").read_text() if (report_dir / "paired.md").is_file() else "",
        "paper_comparison": paper_comparison(
            effectiveness, load_schema(run_dir / "data"), config.report.ordering
        ).markdown(),
    }
    name = args.name or f"guidance_{report['config']}"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{name}.json", report)
    atomic_write_text(args.out / f"{name}.md", markdown(report))
    print(markdown(report))
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
