"""Soak test of counterfactual fine-tuning: thousands of steps through the real loop, memory and speed
compared between a window at the start and one at the end.

The run is ``training.loop.fit`` on a ``CounterfactualFineTuning`` module exactly as the pipeline's
fine-tuning stage builds it (HVAE cpu preset on the tiny 16 x 96 phantom, spline flows, a small
U-Net segmentor, positional-segmentor guidance), with checkpoints, EMA and logging on. Each step
records its wall time and the process's resident memory (anonymous and total, /proc/self/status).
Bars: anonymous RSS grows by less than 5 % (+ 50 MB slack) and steps/s falls by less than 10 %
from the start window (after warm-up) to the end window.

Usage:
  python benchmarks/soak_finetune.py                    # 2,000 steps -> benchmarks/results/soak_finetune.{json,md}
  python benchmarks/soak_finetune.py --steps 100 --window 20 --out /tmp/soak   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from proc_memory import resident

from causalimg.builder import Builder, split_parents
from causalimg.config.loader import load_config
from causalimg.config.sections import TrainConfig
from causalimg.core.guidance import GuidancePredictors
from causalimg.core.transform import VariableTransform
from causalimg.plugins.manager import load_registry
from causalimg.training.accelerator import finish, make_accelerator
from causalimg.training.finetune import CounterfactualFineTuning
from causalimg.training.loop import fit

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024


def build(root: Path, seed: int) -> tuple[CounterfactualFineTuning, Any]:
    """The tiny config's phantom (32 training images), the cpu HVAE and positional-segmentor guidance,
    built as the finetune stage builds them."""
    registry = load_registry()
    config = load_config("tiny", ["finetune.strategies.soak=[{name: positional-segmentor}]"], registry)
    build = Builder(config, registry)
    source = build.data_source(root)
    train = source.split("train")
    transform = VariableTransform.fit(source.schema.names, split_parents(train))
    torch.manual_seed(seed)
    dscm = build.dscm(source.schema, source.image_shape, transform)
    strategies = build.guidance("soak", GuidancePredictors(segmentor=build.segmentor(source.schema)))
    return build.finetuning(dscm, strategies, source.schema, float(source.spacing_mm) ** 2, eps=1.0), train


def window(records: list[dict[str, float]], start: int, size: int) -> dict[str, float]:
    part = records[start : start + size]
    step_s = statistics.median(r["seconds"] for r in part)
    return {
        "steps": f"{part[0]['step']}-{part[-1]['step']}",
        "steps_per_s": 1.0 / step_s,
        "rss_anon_mb": statistics.median(r["RssAnon"] for r in part) / MB,
        "rss_total_mb": statistics.median(r["VmRSS"] for r in part) / MB,
    }


def soak(steps: int, size: int, warmup: int, batch_size: int, threads: int, workdir: Path) -> dict[str, Any]:
    torch.set_num_threads(threads)
    cft, train = build(workdir / "data", seed=0)
    records: list[dict[str, float]] = []
    last = [time.perf_counter()]

    def objective(model: torch.nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """The real objective; records the time since the previous step began and memory."""
        now = time.perf_counter()
        if step > 0:
            records.append({"step": step - 1, "seconds": now - last[0], **resident()})
        last[0] = now
        return model(batch)

    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=1e-4,
        warmup_steps=10,
        checkpoint_every=500,
        log_every=50,
        skip_check_after=steps,
    )
    accelerator = make_accelerator(config, workdir / "finetune")
    began = time.perf_counter()
    cft.train()
    try:
        result = fit(
            cft,
            objective,
            train,
            config,
            workdir / "finetune",
            accelerator,
            seed=0,
            parameters=cft.trainable,
            desc="soak",
        )
    finally:
        finish(accelerator)
    wall = time.perf_counter() - began
    start, end = window(records, warmup, size), window(records, len(records) - size, size)
    growth_mb = end["rss_anon_mb"] - start["rss_anon_mb"]
    slowdown = 1.0 - end["steps_per_s"] / start["steps_per_s"]
    return {
        "steps": steps, "batch_size": batch_size, "threads": threads, "window": size, "warmup": warmup,
        "wall_s": wall, "skipped_steps": result.summary.get("skipped_steps"),
        "start": start, "end": end, "rss_anon_growth_mb": growth_mb, "slowdown": slowdown,
        "peak_rss_total_mb": max(r["VmRSS"] for r in records) / MB,
        "memory_ok": growth_mb < 0.05 * start["rss_anon_mb"] + 50, "speed_ok": slowdown < 0.10,
        "load_average_1min_at_end": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def markdown(r: dict[str, Any], argv: Sequence[str]) -> str:
    def row(name: str, w: dict[str, Any]) -> str:
        return f"| {name} | {w['steps']} | {w['steps_per_s']:.3f} | {w['rss_anon_mb']:.0f} | {w['rss_total_mb']:.0f} |"

    return "\n".join(
        [
            "# Fine-tuning soak (CPU, fp32)",
            "",
            f"Command: `{' '.join(['python benchmarks/soak_finetune.py', *argv])}`; {r['steps']} steps, batch {r['batch_size']}, "
            f"{r['threads']} threads, {r['wall_s']:.0f} s wall, {r['skipped_steps']} skipped steps; "
            f"1-minute load average {r['load_average_1min_at_end']:.1f} at the end (shared machine).",
            "",
            "| window | steps | steps/s (median) | anonymous RSS MB | total RSS MB |",
            "|---|---|---|---|---|",
            row("start", r["start"]),
            row("end", r["end"]),
            "",
            f"Anonymous memory growth: {r['rss_anon_growth_mb']:+.1f} MB ({'ok' if r['memory_ok'] else 'FAILS'}: bar < 5 % + 50 MB). "
            f"Slowdown: {100 * r['slowdown']:+.1f} % ({'ok' if r['speed_ok'] else 'FAILS'}: bar < 10 %). "
            f"Peak total RSS {r['peak_rss_total_mb']:.0f} MB.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--window", type=int, default=100, help="steps per measuring window")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the start window")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.steps < args.warmup + 2 * args.window:
        parser.error(f"--steps must be at least --warmup + 2 x --window = {args.warmup + 2 * args.window}")
    with tempfile.TemporaryDirectory(prefix="causalimg-soak-") as tmp:
        result = soak(args.steps, args.window, args.warmup, args.batch_size, args.threads, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak_finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, sys.argv[1:] if argv is None else argv)
    (args.out / "soak_finetune.md").write_text(text)
    print(text)
    return 0 if result["memory_ok"] and result["speed_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
