"""kill -9 of the real run command at random points, then reruns: the result is bit-identical.

One uninterrupted run of a shrunk tiny config is the reference. A second run is SIGKILLed at a
random time, rerun with ``--resume`` and killed again at a later random time, then rerun to the
end; its weights (safetensors, bit for bit), transform, metrics and report results must equal the
reference's. The seed of the kill times is printed (``CAUSALIMG_FAULT_SEED`` repeats a run). Every
stage, several points each: benchmarks/fault_injection.py (figures in docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fault_injection import command, compare, run_and_kill, run_to_end  # noqa: E402

pytestmark = pytest.mark.slow

# The tiny config with one guided strategy and two HVAE steps (a checkpoint after each).
OVERRIDES = [
    "finetune.strategies={none: [], positional-segmentor: [{name: positional-segmentor}]}",
    "pretrain.steps=2",
    "pretrain.checkpoint_every=1",
]
TIMEOUT = 900.0


def test_kill_9_twice_at_random_points_then_resume_is_bit_identical(tmp_path):
    seed = int(os.environ.get("CAUSALIMG_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    began = time.perf_counter()
    stages = run_to_end(command("tiny", tmp_path / "reference", OVERRIDES, resume=False), TIMEOUT)
    total = time.perf_counter() - began
    assert "report" in stages and "pretrain" in stages

    run_dir = tmp_path / "killed"
    first, second = sorted(rng.uniform(0.1, 0.9) * total for _ in range(2))
    landed = [run_and_kill(command("tiny", run_dir, OVERRIDES, resume=False), None, first, TIMEOUT)]
    landed.append(run_and_kill(command("tiny", run_dir, OVERRIDES, resume=True), None, second - first, TIMEOUT))
    print(f"CAUSALIMG_FAULT_SEED={seed}: killed at {first:.1f} s and {second - first:.1f} s, in stages {landed}")
    assert landed[0] is not None, "the first kill came after the run ended"
    run_to_end(command("tiny", run_dir, OVERRIDES, resume=True), TIMEOUT)
    assert compare(tmp_path / "reference", run_dir) == []
