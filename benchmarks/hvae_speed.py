"""HVAE training throughput and peak memory on CPU, per preset, input size and execution mode.

Each measurement runs in its own process (peak RSS is per process), with 2 threads, batch 32,
forward + backward + AdamW, a few warm-up steps, then timed steps. Modes change how the same
model is executed, never what it computes:

  fp32             default allocator, float32, contiguous
  fp32-malloc      glibc told to keep big buffers (no mmap/munmap per activation)
  fp32-cl          + channels_last
  bf16-cl          + bf16 autocast
  bf16-cl-ckpt     + activation checkpointing (memory)
  bf16-cl-tcmalloc bf16-cl with gperftools' tcmalloc preloaded (LD_PRELOAD) instead of glibc malloc
  bf16-cl-ckpt-tcmalloc   the same with activation checkpointing

The tcmalloc modes need libtcmalloc_minimal (Debian/Ubuntu: `apt install libtcmalloc-minimal4`);
they exit with a message naming the package when it is missing.

Usage:
  python benchmarks/hvae_speed.py                  # full table -> benchmarks/results/hvae_speed.{json,md}
  python benchmarks/hvae_speed.py --only paper:32x192:bf16-cl --steps 3
  python benchmarks/hvae_speed.py --profile paper:32x192:bf16-cl   # torch.profiler top ops
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("fp32", "fp32-malloc", "fp32-cl", "bf16-cl", "bf16-cl-ckpt", "bf16-cl-tcmalloc", "bf16-cl-ckpt-tcmalloc")
TCMALLOC = "libtcmalloc_minimal.so.4"
RESULTS = Path(__file__).parent / "results"
# what the full table measures: paper at 64 x 384 without checkpointing needs ~15-20 GiB, so only the
# checkpointed modes run there (the machine is shared and has 23 GiB)
DEFAULT_RUNS = [
    *(f"cpu:32x192:{m}" for m in MODES),
    *(f"cpu:64x384:{m}" for m in ("fp32-malloc", "bf16-cl")),
    *(f"paper:32x192:{m}" for m in ("fp32-malloc", "bf16-cl", "bf16-cl-ckpt", "bf16-cl-tcmalloc")),
    "paper:64x384:bf16-cl-ckpt",
    "paper:64x384:bf16-cl-ckpt-tcmalloc",
]


def keep_malloc_arenas(mode: str) -> None:
    """mallopt(M_MMAP_MAX, 0) and a huge M_TRIM_THRESHOLD: activations reuse heap memory instead of
    being mmap'ed and unmapped every step (the kernel time that dominated fp32 here). Every glibc
    mode but plain ``fp32`` (the untuned reference) gets it; tcmalloc modes do not use glibc malloc."""
    if mode == "fp32" or mode.endswith("tcmalloc"):
        return
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)


def child_env(mode: str) -> dict[str, str]:
    """The environment of one measurement: tcmalloc modes preload it into the child process."""
    env = dict(os.environ)
    if mode.endswith("tcmalloc"):
        if ctypes.util.find_library("tcmalloc_minimal") is None:
            raise SystemExit(f"mode {mode!r} needs {TCMALLOC} (apt install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = TCMALLOC
    return env


def allocator() -> str:
    """Which malloc this process runs on, read from its own memory maps."""
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return next((name for name in ("tcmalloc", "jemalloc") if name in maps), "glibc")


def parse_run(run: str) -> tuple[str, tuple[int, int], str]:
    preset, shape, mode = run.split(":")
    h, w = (int(s) for s in shape.split("x"))
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    return preset, (h, w), mode


def build(preset: str, shape: tuple[int, int], mode: str, batch: int):
    import torch

    from causalimg.mechanisms.hvae import HVAE, HVAEConfig

    torch.manual_seed(0)
    config = HVAEConfig(preset=preset, checkpointing="-ckpt" in mode)
    model = HVAE.from_config(config, image_shape=shape, num_parents=9)
    fmt = torch.channels_last if "-cl" in mode else torch.contiguous_format
    model = model.to(memory_format=fmt)
    # fused AdamW: one kernel over all parameters instead of ~8 small ops per tensor (~10% of a step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.9), weight_decay=0.01, fused=True)
    x = (torch.rand(batch, 1, *shape) * 2 - 1).contiguous(memory_format=fmt)
    pa = torch.rand(batch, 9) * 2 - 1
    dtype = torch.bfloat16 if mode.startswith("bf16") else None

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model.loss(x, pa)["nelbo"].mean()
        loss.backward()
        opt.step()
        return loss.item()

    return model, step


def measure(run: str, steps: int, warmup: int, batch: int) -> dict:
    preset, shape, mode = parse_run(run)
    keep_malloc_arenas(mode)
    import torch

    torch.set_num_threads(2)
    model, step = build(preset, shape, mode, batch)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    dt = time.perf_counter() - t0
    return {
        "preset": preset, "input": f"{shape[0]}x{shape[1]}", "mode": mode, "batch": batch, "steps": steps,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "img_per_s": round(batch * steps / dt, 2),
        "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "final_loss": round(losses[-1], 4),
        "allocator": allocator(),
        "load_1m": round(os.getloadavg()[0], 1),  # other processes on the machine during the run
    }  # fmt: skip


def profile(run: str, batch: int) -> None:
    preset, shape, mode = parse_run(run)
    keep_malloc_arenas(mode)
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(2)
    _, step = build(preset, shape, mode, batch)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def write(results: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": 2, "cpus": os.cpu_count()}
    (RESULTS / "hvae_speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# HVAE training speed (CPU, 2 threads, batch 32, forward + backward + AdamW)",
        "",
        "Written by `python benchmarks/hvae_speed.py`. Modes change execution, not the model.",
        "",
        "| preset | input | mode | params (M) | img/s | peak RSS (GiB) | allocator | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['mode']} | {r['params_M']} | {r['img_per_s']} "
            f"| {r['peak_rss_GiB']} | {r.get('allocator', '')} | {r.get('load_1m', '')} |"
        )
    (RESULTS / "hvae_speed.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="runs preset:HxW:mode (default: the full table)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--profile", metavar="RUN")
    parser.add_argument("--child", metavar="RUN", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.profile:
        return profile(args.profile, args.batch)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.batch)))
        return
    results = []
    for run in args.only or DEFAULT_RUNS:
        cmd = [sys.executable, __file__, "--child", run, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(parse_run(run)[2]))
        if out.returncode:
            raise SystemExit(f"{run} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        results.append(result)
        if not args.no_write:  # after every run: a long table interrupted still leaves its rows
            write(results)


if __name__ == "__main__":
    main()
