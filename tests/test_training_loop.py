"""The shared training loop: warm-up, EMA, skips, accumulation, checkpoints, resume, safe loading."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from causalimg import io
from causalimg.config.sections import TrackingConfig, TrainConfig
from causalimg.errors import ConfigError, DataError, TrainingError
from causalimg.training import checkpoint as ckpt
from causalimg.training.accelerator import make_accelerator, tune_malloc
from causalimg.training.ema import EMA
from causalimg.training.loop import fit, warmup_lr

BASE = dict(steps=8, batch_size=4, lr=1e-2, warmup_steps=3, ema_decay=0.9, checkpoint_every=3, log_every=2)


class Multiplier:
    """A Lagrange-multiplier-like extra state: a tensor and a counter the objective updates."""

    def __init__(self) -> None:
        self.value, self.calls = torch.zeros(()), 0

    def state_dict(self) -> dict:
        return {"value": self.value.clone(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.calls = state["value"].clone(), int(state["calls"])


def make_data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def make_objective(
    fail_at: int | None = None, nan_at: tuple[int, ...] = (), sleep: float = 0.0, extra=None, noise: float = 0.01
):
    """MSE of inputs with random noise (so resume must reproduce the RNG stream too)."""

    def objective(model, batch, step):
        if step == fail_at:
            raise RuntimeError(f"injected failure at step {step}")
        if sleep:
            time.sleep(sleep)
        x, y = batch
        loss = ((model(x + noise * torch.randn_like(x)) - y) ** 2).mean()
        if extra is not None:
            extra.value = extra.value + loss.detach()
            extra.calls += 1
        if step in nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "batch": torch.tensor(float(len(x)))}

    return objective


def train(out: Path, objective=None, resume: bool = False, extra=None, **overrides):
    config = TrainConfig(**{**BASE, **overrides})
    model = make_model()
    accelerator = make_accelerator(config, out)
    result = fit(
        model,
        objective or make_objective(extra=extra),
        make_data(),
        config,
        out,
        accelerator,
        seed=3,
        resume=resume,
        extra_state=[extra] if extra is not None else (),
        desc="test",
    )
    return model, result


def test_warmup_is_linear_then_constant():
    config = TrainConfig(lr=1.0, warmup_steps=4)
    assert [warmup_lr(s, config) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(0, TrainConfig(lr=0.3, warmup_steps=0)) == 0.3


def test_first_step_uses_warmed_up_learning_rate(tmp_path):
    # AdamW's first update moves every weight by exactly its learning rate (|m / sqrt(v)| = 1).
    before = [p.detach().clone() for p in make_model().parameters()]
    model, _ = train(tmp_path, steps=1, lr=1e-2, warmup_steps=10, weight_decay=0.0, ema_decay=0.0)
    steps = torch.cat([(p - b).abs().flatten() for p, b in zip(model.parameters(), before)])
    assert torch.allclose(steps, torch.full_like(steps, 1e-3), rtol=1e-3)


def test_ema_follows_the_ramped_decay():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.999, 2/11)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)
    ema.update(model)  # decay 3/12
    assert ema.shadow["weight"].item() == pytest.approx(1 - (2 / 11) * (3 / 12))
    restored = EMA(model, 0.999)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_saved_weights_are_the_ema_and_loaded_into_the_model(tmp_path):
    model, result = train(tmp_path)
    saved = io.load_tensors(result.weights)
    raw = io.load_tensors(tmp_path / "checkpoints" / "step_00000008" / ckpt.MODEL_FILE)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(saved["0.weight"], raw["0.weight"])  # the average lags the last weights
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["skipped_steps"] == 0 and summary["images_per_s"] > 0
    assert math.isfinite(summary["final_loss"]) and summary["final_metrics"] == {"batch": 4.0}
    assert summary == result.summary


def test_nan_loss_skips_the_step_without_touching_weights(tmp_path):
    seen = {}

    def objective(model, batch, step):
        seen[step] = [p.detach().clone() for p in model.parameters()]
        return make_objective(nan_at=(2, 5))(model, batch, step)

    model, result = train(tmp_path, objective=objective, max_skip_fraction=1.0)
    assert result.summary["skipped_steps"] == 2
    assert result.summary["skip_reasons"] == {"non-finite loss": 2}
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_and_large_norm_are_skipped(tmp_path):
    def objective(model, batch, step):
        out = make_objective()(model, batch, step)
        if step == 1:
            out["loss"].register_hook(lambda g: g * float("inf"))
        return out

    _, result = train(tmp_path, objective=objective, max_skip_fraction=1.0, skip_grad_norm=1e-9, skip_check_after=6)
    assert result.summary["skip_reasons"] == {"non-finite gradient": 1, "gradient norm above skip_grad_norm": 2}


def test_too_many_skips_stop_with_the_last_good_checkpoint(tmp_path):
    objective = make_objective(nan_at=tuple(range(10, 100)))
    with pytest.raises(TrainingError, match=r"10 of 20 steps skipped.*max_skip_fraction=0.3.*step_00000015"):
        train(tmp_path, objective=objective, steps=50, checkpoint_every=5, max_skip_fraction=0.3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010", "step_00000015"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    objective = make_objective(noise=0.0)
    big, _ = train(tmp_path / "big", objective, batch_size=8, grad_accumulation=1, checkpoint_every=100)
    small, _ = train(tmp_path / "small", objective, batch_size=4, grad_accumulation=2, checkpoint_every=100)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_interrupted_then_resumed_run_is_bit_identical(tmp_path):
    extra_ref = Multiplier()
    ref, ref_result = train(tmp_path / "ref", extra=extra_ref, grad_accumulation=2)
    extra = Multiplier()
    with pytest.raises(RuntimeError, match="injected failure at step 7"):
        train(tmp_path / "run", objective=make_objective(fail_at=7, extra=extra), extra=extra, grad_accumulation=2)
    assert ckpt.list_checkpoints(tmp_path / "run")[-1].name == "step_00000006"
    with pytest.raises(TrainingError, match="pass --resume"):  # never overwrites an earlier run
        train(tmp_path / "run", grad_accumulation=2)
    extra = Multiplier()
    resumed, result = train(tmp_path / "run", extra=extra, resume=True, grad_accumulation=2)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(extra.value, extra_ref.value) and extra.calls == extra_ref.calls
    assert result.summary["resumed_from_step"] == 6
    assert result.summary["final_loss"] == ref_result.summary["final_loss"]


def test_resume_refuses_a_changed_config(tmp_path):
    train(tmp_path, steps=3)
    with pytest.raises(TrainingError, match=r"lr: 0.01 -> 0.02"):
        train(tmp_path, steps=6, lr=2e-2, resume=True)
    _, result = train(tmp_path, steps=6, resume=True)  # more steps is fine
    assert result.summary["steps"] == 6 and result.summary["resumed_from_step"] == 3


def _killed_run(out: str) -> None:
    """Entry point of the subprocess of the kill -9 test."""
    train(Path(out), objective=make_objective(sleep=0.15), checkpoint_every=2)


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    ref, _ = train(tmp_path / "ref", checkpoint_every=2)
    out = tmp_path / "run"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from test_training_loop import _killed_run; _killed_run({str(out)!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ckpt.list_checkpoints(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = ckpt.list_checkpoints(out)
    assert done and ckpt.checkpoint_step(done[-1]) < 8, "the run must be killed part-way"
    resumed, _ = train(out, resume=True, checkpoint_every=2)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_keeps_only_the_newest_checkpoints_and_ignores_partial_ones(tmp_path):
    partial = tmp_path / "checkpoints" / ".tmp-step_00000099"
    incomplete = tmp_path / "checkpoints" / "step_00000098"  # no trainer_state.json: not complete
    partial.mkdir(parents=True)
    incomplete.mkdir()
    train(tmp_path, steps=10, checkpoint_every=2, keep_checkpoints=2, resume=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000008", "step_00000010"]
    assert not partial.exists()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    real = io.save_tensors
    calls = {"n": 0}

    def full_disk(path, state):
        calls["n"] += 1
        if calls["n"] > 2:  # the second checkpoint's model file
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, state)

    monkeypatch.setattr(io, "save_tensors", full_disk)
    with pytest.raises(TrainingError, match=r"No space left.*step_00000003 is untouched"):
        train(tmp_path)
    monkeypatch.setattr(io, "save_tensors", real)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003"]
    _, result = train(tmp_path, resume=True)
    assert result.summary["resumed_from_step"] == 3


def test_unwritable_or_full_output_dir_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(TrainingError, match=r"a-file/run is not writable"):
        train(tmp_path / "a-file" / "run", objective=make_objective(fail_at=0))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024))
    with pytest.raises(TrainingError, match=r"0 MiB free"):
        train(tmp_path / "full", objective=make_objective(fail_at=0))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path) -> None:
    evil = _Evil()
    evil.marker = marker
    path.write_bytes(pickle.dumps({"state": evil}, protocol=2))


def test_pickled_weights_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    model = make_model()
    for name in ("weights.pt", "weights.bin", "weights.pkl", "weights.safetensors"):
        _evil_pickle(tmp_path / name, marker)
        with pytest.raises(DataError, match=name):
            io.load_module(model, tmp_path / name)
    # A checkpoint whose pickle-based optimizer and custom-state files were replaced.
    train(tmp_path / "run", steps=3)
    last = ckpt.list_checkpoints(tmp_path / "run")[-1]
    _evil_pickle(last / "optimizer.bin", marker)
    _evil_pickle(last / "custom_checkpoint_0.pkl", marker)
    with pytest.raises(DataError, match="optimizer.bin|could not be read safely"):
        train(tmp_path / "run", steps=6, resume=True)
    assert not marker.exists()


def test_objective_without_loss_and_fp16_on_cpu_are_clear_errors(tmp_path):
    with pytest.raises(TrainingError, match="scalar 'loss'"):
        train(tmp_path, objective=lambda model, batch, step: {"mse": model(batch[0]).mean()})
    with pytest.raises(ConfigError, match="fp16"):
        make_accelerator(TrainConfig(mixed_precision="fp16"), tmp_path)


def test_bf16_channels_last_and_tensorboard(tmp_path):
    config = TrainConfig(**{**BASE, "mixed_precision": "bf16", "channels_last": True, "steps": 4})
    accelerator = make_accelerator(config, tmp_path, tracking=TrackingConfig(tensorboard=True))
    conv = nn.Conv2d(1, 2, 3, padding=1)
    images = TensorDataset(torch.randn(8, 1, 6, 10))

    def objective(model, batch, step):
        (x,) = batch
        assert x.is_contiguous(memory_format=torch.channels_last)
        out = model(x)
        assert out.dtype == torch.bfloat16
        return {"loss": out.float().pow(2).mean()}

    result = fit(conv, objective, images, config, tmp_path, accelerator, seed=0, desc="bf16")
    assert result.summary["mixed_precision"] == "bf16" and result.summary["skipped_steps"] == 0
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))


def test_tied_weights_are_saved_and_loaded(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    io.save_tensors(tmp_path / "tied.safetensors", model.state_dict())
    copy = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    copy[1].weight = copy[0].weight
    io.load_module(copy, tmp_path / "tied.safetensors")
    assert torch.equal(copy[1].weight, model[0].weight) and copy[1].weight is copy[0].weight


def test_parameter_subset_freezes_the_rest_for_the_run(tmp_path):
    model = make_model()
    frozen = model[0].weight.detach().clone()
    config = TrainConfig(**BASE)
    fit(
        model,
        make_objective(),
        make_data(),
        config,
        tmp_path,
        make_accelerator(config, tmp_path),
        seed=0,
        parameters=model[2].parameters(),
    )
    assert torch.equal(model[0].weight, frozen) and model[0].weight.requires_grad


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_malloc_tuning_applies_on_glibc():
    assert tune_malloc()
