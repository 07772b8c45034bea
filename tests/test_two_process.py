"""Two gloo ranks train together through ``accelerate launch``: same weights, clean exit, shared failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# Each rank trains the same tiny model, saves its own final weights, and ends through ``finish``.
SCRIPT = """
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from causalimg.config.sections import TrainConfig
from causalimg.training.accelerator import finish, make_accelerator
from causalimg.training.loop import fit

out, fail_rank = Path(sys.argv[1]), int(sys.argv[2])
config = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=3)
accelerator = make_accelerator(config, out)
rank = accelerator.process_index
print(f"rank {rank} of {accelerator.num_processes}", flush=True)
torch.manual_seed(rank)  # different initial weights: fit must start every rank from rank 0's
model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
data = TensorDataset(x, x.sum(1, keepdim=True))


def objective(model, batch, step):
    if rank == fail_rank and step == 4:
        raise ValueError(f"injected failure on rank {rank}")
    x, y = batch
    return {"loss": ((model(x + 0.01 * torch.randn_like(x)) - y) ** 2).mean()}


try:
    fit(model, objective, data, config, out, accelerator, seed=0, desc="two-process")
except BaseException:
    finish(accelerator, ok=False)
    raise
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
finish(accelerator)
"""


def _launch(tmp_path: Path, fail_rank: int) -> subprocess.CompletedProcess:
    script = tmp_path / "train_two.py"
    script.write_text(SCRIPT)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # --multi_gpu with 2 processes runs two gloo ranks on CPU (--cpu --num_processes 2 runs only one).
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(script),
        str(tmp_path / "run"),
        str(fail_rank),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_two_ranks_end_with_identical_weights_and_a_clean_exit(tmp_path):
    from safetensors.torch import load_file

    done = _launch(tmp_path, fail_rank=-1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" in done.stdout
    assert "terminate called" not in done.stderr
    a, b = (load_file(tmp_path / "run" / f"rank{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_failure_on_one_rank_stops_both_with_its_error(tmp_path):
    done = _launch(tmp_path, fail_rank=1)
    assert done.returncode != 0
    assert "ValueError: injected failure on rank 1" in done.stderr
    # rank 0 stops too, naming rank 1's error, rather than waiting in a collective
    assert "failed on another process (rank 1: ValueError: injected failure on rank 1)" in done.stderr
    assert not (tmp_path / "run" / "rank0.safetensors").exists()
