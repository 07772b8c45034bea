"""Run the real command line and compare run folders bit for bit: what reproducibility checks need.

``tests/test_faults_pipeline.py`` and ``benchmarks/fault_injection.py`` use these to kill runs at
chosen points and check that a resumed run ends exactly where an uninterrupted one does; a plugin
author can do the same for a run that uses their components.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

STAGE_LINE = re.compile(r"^\[(?P<stage>[^\]]+)\] (?P<what>running|done in (?P<seconds>[0-9.]+) s|up to date)")
IGNORED_JSON_KEYS = {
    "seconds",
    "finished",
    "started",
    "wall_time_s",
    "session_time_s",
    "images_per_s",
    "resumed_from_step",
    "upstream_finished",
    "timing",
    "timings",
    "report",
}


def command(config: str, run_dir: Path, overrides: Sequence[str], resume: bool, only: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "causalimg.run", "--config", config, "--set", f"run.dir={run_dir}"]
    argv += [arg for text in overrides for arg in ("--set", text)]
    return argv + (["--resume"] if resume else []) + (["--only", only] if only else [])


def group_of(stage: str) -> str:
    return stage.split("/", 1)[0]


def run_to_end(argv: list[str], timeout: float) -> dict[str, float]:
    """Run a command to completion; returns stage -> seconds of the stages it ran."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return {
        m["stage"]: float(m["seconds"]) for m in map(STAGE_LINE.match, result.stdout.splitlines()) if m and m["seconds"]
    }


def run_and_kill(argv: list[str], stage: str | None, delay: float, timeout: float) -> str | None:
    """Start the run, SIGKILL its process group ``delay`` s after ``stage`` starts (None: after start).

    Returns the stage that was running when the kill landed, "(between stages)" when none was,
    or None when the run ended before the kill."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # stage lines as they happen
    running: list[str | None] = [None]
    killed = threading.Event()

    def kill() -> None:
        if proc.poll() is None:
            killed.set()
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(delay, kill) if stage is None else None
    if timer is not None:
        timer.start()
    deadline = threading.Timer(timeout, kill)
    deadline.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        match = STAGE_LINE.match(line)
        if not match or killed.is_set():
            continue
        if match["what"] == "running":
            running[0] = match["stage"]
            if stage in (match["stage"], group_of(match["stage"])) and timer is None:
                timer = threading.Timer(delay, kill)
                timer.start()
        elif match["stage"] == running[0]:
            running[0] = None
    proc.wait()
    deadline.cancel()
    if timer is not None:
        timer.cancel()
    if not killed.is_set():
        return None
    return running[0] or "(between stages)"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN sentinels included, which ``torch.equal`` calls different)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    )


def compare(reference: Path, other: Path, group: str | None = None) -> list[str]:
    """Differences in weights (bitwise), the transform, metrics and the report's results
    (of one stage group's folder, or of the whole run)."""
    problems = []
    weights = sorted(p.relative_to(reference) for p in reference.rglob("*.safetensors") if "checkpoints" not in p.parts)
    jsons = [Path("data/transform.json"), Path("report/results.json")]
    jsons += sorted(p.relative_to(reference) for p in reference.glob("evaluate/*/metrics.json"))
    if group is not None:
        weights = [rel for rel in weights if rel.parts[0] == group]
        jsons = [rel for rel in jsons if rel.parts[0] == group]
    for rel in weights:
        if not (other / rel).is_file():
            problems.append(f"{rel}: missing")
            continue
        a, b = load_file(reference / rel), load_file(other / rel)
        if a.keys() != b.keys() or any(not same_bits(a[k], b[k]) for k in a):
            worst = max((float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b), default=float("nan"))
            problems.append(f"{rel}: differs (max abs {worst:.3g})")
    for rel in jsons:
        if not (other / rel).is_file():
            problems.append(f"{rel}: missing")
        elif _strip(json.loads((reference / rel).read_text())) != _strip(json.loads((other / rel).read_text())):
            problems.append(f"{rel}: differs")
    if not weights and not jsons:
        problems.append("nothing to compare")
    return problems


def _strip(value: Any) -> Any:
    """JSON without wall-clock fields and absolute run paths."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in IGNORED_JSON_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Stage -> seconds, from the done.json files of a finished run, in run order."""
    records = {p: json.loads(p.read_text()) for p in run_dir.glob("**/done.json")}
    stages = sorted((r["finished"], p) for p, r in records.items() if "finished" in r and "seconds" in r)
    return {str(p.parent.relative_to(run_dir)): records[p]["seconds"] for _, p in stages}
