"""Execution speed-ups that must not change what is computed, and the logic of the speed benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from causalimg.config.sections import TrainConfig
from causalimg.training.loop import make_adamw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hvae_reference
import hvae_speed

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_adamw_is_fused_and_updates_like_the_per_tensor_one() -> None:
    config = TrainConfig(lr=1e-2, weight_decay=0.05)
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = make_adamw(weights, config)
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(twins, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, foreach=False)
    for step in range(3):
        for w, t in zip(weights, twins, strict=True):
            g = torch.randn_like(w) * (step + 1)
            w.grad, t.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for w, t in zip(weights, twins, strict=True):
        torch.testing.assert_close(w, t, rtol=1e-6, atol=1e-7)


def test_training_adamw_falls_back_for_non_float_parameters() -> None:
    assert not make_adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], TrainConfig()).defaults["fused"]


def test_speed_benchmark_step_counts_flops_and_runs_compiled() -> None:
    """The CUDA benchmark's path (bf16, channels_last, compiled) on CPU with a tracing-only backend."""
    _, step = hvae_speed.build("cpu", (8, 48), "bf16-cl-compile", batch=2, device="cpu", backend="eager")
    losses = [step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    gflop = hvae_speed.step_gflop(hvae_speed.build("cpu", (8, 48), "bf16-cl", batch=2)[1])
    doubled = hvae_speed.step_gflop(hvae_speed.build("cpu", (8, 48), "bf16-cl", batch=4)[1])
    assert gflop > 0 and doubled == pytest.approx(2 * gflop, rel=0.05)  # FLOPs scale with the batch


def test_fraction_of_the_machines_throughput() -> None:
    peaks = hvae_speed.machine_throughput("cpu", threads=1, repeats=1)
    assert set(peaks) == {f"{d}_{k}_GFLOPs" for d in ("bf16", "fp32") for k in ("matmul", "conv")}
    assert all(v > 0 for v in peaks.values())
    row = hvae_speed.with_fractions({"achieved_GFLOPs": 50.0}, {"bf16_matmul_GFLOPs": 200.0, "fp32_matmul_GFLOPs": 100})
    assert row["fraction_of_bf16_matmul"] == 0.25 and row["fraction_of_fp32_matmul"] == 0.5


def test_cuda_device_helpers_are_chosen_by_device_type() -> None:
    cpu = hvae_speed.Device("cpu")
    cpu.sync()  # nothing to wait for
    assert cpu.type == "cpu" and cpu.peak_memory_GiB() > 0  # resident memory of this process


def test_reference_is_copied_with_its_one_line_fix(tmp_path: Path) -> None:
    source = tmp_path / "causal_models" / "hvae2.py"
    source.parent.mkdir()
    source.write_text(f"x = 1\n            {hvae_reference.UNFIXED}\n                pass\n")
    fixed = hvae_reference.fixed_reference(tmp_path)
    text = (fixed / "hvae2_fixed.py").read_text()
    assert hvae_reference.FIXED in text and hvae_reference.UNFIXED not in text
    source.write_text("x = 1\n")  # another commit: the fix cannot be applied blindly
    with pytest.raises(SystemExit, match="expected the line"):
        hvae_reference.fixed_reference(tmp_path)


def test_reference_comparison_takes_each_models_best_mode_per_allocator() -> None:
    def run(model, mode, alloc, speed, rss=1.0):
        return {"model": model, "mode": mode, "allocator": alloc, "img_per_s": speed, "peak_rss_GiB": rss}

    results = [
        run("reference", "fp32", "glibc", 4.0, 5.0), run("reference", "bf16-cl", "glibc", 6.0, 4.0),
        run("reference", "bf16-cl", "glibc", 8.0, 4.0), run("causalimg", "bf16-cl", "glibc", 14.0, 2.0),
        run("reference", "bf16-cl", "tcmalloc", 7.0), run("causalimg", "bf16-cl", "tcmalloc", 21.0),
    ]  # fmt: skip
    summary = {s["allocator"]: s for s in hvae_reference.summarise(results)}
    assert summary["glibc"]["reference"]["mode"] == "bf16-cl" and summary["glibc"]["reference"]["img_per_s"] == 7.0
    assert summary["glibc"]["speed_ratio"] == 2.0 and summary["glibc"]["memory_ratio"] == 0.5
    assert summary["tcmalloc"]["speed_ratio"] == 3.0


def test_reference_runs_alternate_between_the_models() -> None:
    args = type(
        "Args", (), {"allocators": ["glibc"], "reference_modes": ["fp32", "bf16-cl"], "causalimg_modes": ["bf16-cl"]}
    )
    assert hvae_reference.plan(args) == ["reference:fp32:glibc", "causalimg:bf16-cl:glibc", "reference:bf16-cl:glibc"]
