"""kill -9 of the real run command at random points, then reruns: the result is bit-identical.

One uninterrupted run of a shrunk tiny config is the reference. A second run is SIGKILLed at a
random point of a random stage, rerun with ``--resume`` and killed again at a random point of a
later stage, then rerun to the end; its weights (safetensors, bit for bit), transform, metrics
and report results must equal the reference's. The kill points come from a fixed seed (``CAUSALIMG_FAULT_SEED`` picks
another). Every stage group, several points each: benchmarks/fault_injection.py.
"""

from __future__ import annotations

import os
import random

import pytest

from causalimg.testing.runs import command, compare, run_and_kill, run_to_end, stage_seconds

pytestmark = pytest.mark.slow

# The tiny config with one guided strategy and two HVAE steps (a checkpoint after each).
OVERRIDES = [
    "finetune.strategies={none: [], positional-segmentor: [{name: positional-segmentor}]}",
    "pretrain.steps=2",
    "pretrain.checkpoint_every=1",
]
TIMEOUT = 900.0


def test_kill_9_twice_at_random_points_then_resume_is_bit_identical(tmp_path):
    seed = int(os.environ.get("CAUSALIMG_FAULT_SEED", "7"))
    rng = random.Random(seed)
    reference = tmp_path / "reference"
    run_to_end(command("tiny", reference, OVERRIDES, resume=False), TIMEOUT)
    seconds = stage_seconds(reference)  # stage -> duration, in run order
    assert "report" in seconds and "pretrain" in seconds

    run_dir = tmp_path / "killed"
    stages = [stage for stage in seconds if stage != "report"]
    long_enough = [stage for stage in stages if seconds[stage] >= 2.0]  # a kill can land inside them
    if len(long_enough) < 2:  # a fast, idle machine: the two longest stages
        long_enough = sorted(stages, key=seconds.__getitem__)[-2:]
    plan = [(stage, rng.uniform(0.05, 0.95)) for stage in sorted(rng.sample(long_enough, 2), key=list(seconds).index)]
    landed = []
    for attempt, (stage, fraction) in enumerate(plan):
        argv = command("tiny", run_dir, OVERRIDES, resume=attempt > 0)
        landed.append(run_and_kill(argv, stage, fraction * seconds[stage], TIMEOUT))
    print(f"CAUSALIMG_FAULT_SEED={seed}: kills planned {plan}, landed in {landed}")
    assert landed[0] is not None, "the first kill came after the run ended"
    run_to_end(command("tiny", run_dir, OVERRIDES, resume=True), TIMEOUT)
    assert compare(reference, run_dir) == []


def test_sigterm_stops_the_run_like_ctrl_c_and_leaves_it_resumable(tmp_path):
    """A scheduler's SIGTERM: one line on stderr, exit 130, no traceback, and --resume accepts the run."""
    import signal
    import subprocess

    run_dir = tmp_path / "run"
    argv = command("tiny", run_dir, OVERRIDES, resume=False)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "running" in line:  # inside the first stage
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    assert "causalimg.run: interrupted" in stderr and "Traceback" not in stderr
    resumed = subprocess.run([*command("tiny", run_dir, OVERRIDES, resume=True), "--dry-run"], capture_output=True,
                             text=True, timeout=TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
