"""HVAE training throughput and peak memory per preset, input size and execution mode, on CPU or CUDA.

Each measurement runs in its own process (peak memory is per process), batch 32, forward + backward
+ AdamW (fused), a few warm-up steps, then timed steps. Modes change how the same model is executed,
never what it computes:

  fp32             default allocator, float32, contiguous
  fp32-malloc      glibc told to keep big buffers (no mmap/munmap per activation)
  fp32-cl          + channels_last
  bf16             bf16 autocast, contiguous
  bf16-cl          + channels_last
  bf16-cl-ckpt     + activation checkpointing (memory)
  bf16-cl-tcmalloc bf16-cl with gperftools' tcmalloc preloaded (LD_PRELOAD) instead of glibc malloc
  bf16-cl-ckpt-tcmalloc   the same with activation checkpointing
  bf16-cl-compile  bf16-cl with the loss compiled by torch.compile (the GPU mode; --device cuda)

A figure that travels between machines: before the runs, a micro-benchmark measures this machine's
own bf16 and fp32 matmul and convolution throughput; every run counts its training step's FLOPs
(torch.utils.flop_counter) and reports the GFLOP/s it reached and their fraction of the measured
bf16 matmul throughput.

The tcmalloc modes need libtcmalloc_minimal (Debian/Ubuntu: `apt install libtcmalloc-minimal4`);
they exit with a message naming the package when it is missing. Runs of the other modes are kept
on glibc malloc even where the environment preloads tcmalloc.

Usage:
  python benchmarks/hvae_speed.py                  # full CPU table -> benchmarks/results/hvae_speed.{json,md}
  python benchmarks/hvae_speed.py --only paper:32x192:bf16-cl --steps 3
  python benchmarks/hvae_speed.py --device cuda    # GPU table -> benchmarks/results/hvae_speed_cuda.{json,md}
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

MODES = (
    "fp32", "fp32-malloc", "fp32-cl", "bf16", "bf16-cl", "bf16-cl-ckpt", "bf16-cl-tcmalloc",
    "bf16-cl-ckpt-tcmalloc", "bf16-cl-compile",
)  # fmt: skip
TCMALLOC = "libtcmalloc_minimal.so.4"
RESULTS = Path(__file__).parent / "results"
THREADS = 2  # CPU threads of every measurement unless --threads says otherwise
# what the full table measures: paper at 64 x 384 without checkpointing needs ~15-20 GiB, so only the
# checkpointed modes run there (the machine is shared and has 23 GiB)
DEFAULT_RUNS = {
    "cpu": [
        *(f"cpu:32x192:{m}" for m in MODES if m != "bf16-cl-compile"),
        *(f"cpu:64x384:{m}" for m in ("fp32-malloc", "bf16-cl")),
        *(f"paper:32x192:{m}" for m in ("fp32-malloc", "bf16-cl", "bf16-cl-ckpt", "bf16-cl-tcmalloc")),
        "paper:64x384:bf16-cl-ckpt",
        "paper:64x384:bf16-cl-ckpt-tcmalloc",
    ],
    "cuda": ["paper:64x384:bf16-cl", "paper:64x384:bf16-cl-compile", "paper:32x192:bf16-cl-compile"],
}


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
    """The environment of one measurement: tcmalloc modes preload it into the child process, the
    others run on glibc malloc (an inherited LD_PRELOAD is dropped)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if mode.endswith("tcmalloc"):
        if ctypes.util.find_library("tcmalloc_minimal") is None:
            raise SystemExit(f"mode {mode!r} needs {TCMALLOC} (apt install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = TCMALLOC
    return env


def allocator() -> str:
    """Which malloc this process runs on, read from its own memory maps."""
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return next((name for name in ("tcmalloc", "jemalloc") if name in maps), "glibc")


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo): an absolute speed figure holds for it alone."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_run(run: str) -> tuple[str, tuple[int, int], str]:
    preset, shape, mode = run.split(":")
    h, w = (int(s) for s in shape.split("x"))
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    return preset, (h, w), mode


class Device:
    """What differs between a CPU and a CUDA measurement: autocast type, waiting, peak memory."""

    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.type = torch.device(name).type
        self.device = torch.device(name)

    def sync(self) -> None:
        if self.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def peak_memory_GiB(self) -> float:
        """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
        if self.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(preset: str, shape: tuple[int, int], mode: str, batch: int, device: str = "cpu", backend: str = "inductor"):
    """The model on ``device`` and one training step (forward + backward + fused AdamW) -> loss."""
    import torch

    from causalimg.mechanisms.hvae import HVAE, HVAEConfig

    torch.manual_seed(0)
    dev = torch.device(device)
    config = HVAEConfig(preset=preset, checkpointing="-ckpt" in mode)
    model = HVAE.from_config(config, image_shape=shape, num_parents=9)
    fmt = torch.channels_last if "-cl" in mode else torch.contiguous_format
    model = model.to(dev).to(memory_format=fmt)
    # fused AdamW: one kernel over all parameters instead of ~8 small ops per tensor (~10% of a step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.9), weight_decay=0.01, fused=True)
    x = (torch.rand(batch, 1, *shape, device=dev) * 2 - 1).contiguous(memory_format=fmt)
    pa = torch.rand(batch, 9, device=dev) * 2 - 1
    bf16 = mode.startswith("bf16")
    # compiled: one graph per input shape, built at the first step (warm-up), never rebuilt after
    loss_fn = torch.compile(model.loss, backend=backend, dynamic=False) if mode.endswith("-compile") else model.loss

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x, pa)["nelbo"].mean()
        loss.backward()
        opt.step()
        return loss.item()

    return model, step


def step_gflop(step) -> float:
    """FLOPs of one training step (matmuls and convolutions, forward and backward), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e9


def machine_throughput(device: str = "cpu", threads: int = THREADS, repeats: int = 3) -> dict[str, float]:
    """This machine's own GFLOP/s: the best of a few bf16 and fp32 matmuls (2048^3) and 3 x 3
    convolutions (batch 32, 64 -> 64 channels, 32 x 192, channels_last, forward)."""
    import torch

    torch.set_num_threads(threads)
    dev = Device(device)
    n = 2048
    out = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        a = torch.randn(n, n, device=dev.device, dtype=dtype)
        x = torch.randn(32, 64, 32, 192, device=dev.device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dev.device, dtype).to(memory_format=torch.channels_last)
        kernels = {"matmul": (torch.mm, (a, a), 2 * n**3), "conv": (conv, (x,), 2 * 64 * 64 * 9 * 32 * 32 * 192)}
        for what, (fn, inputs, flop) in kernels.items():
            with torch.no_grad():
                fn(*inputs)
                best = float("inf")
                for _ in range(repeats):
                    dev.sync()
                    t0 = time.perf_counter()
                    fn(*inputs)
                    dev.sync()
                    best = min(best, time.perf_counter() - t0)
            out[f"{name}_{what}_GFLOPs"] = round(flop / best / 1e9, 1)
    return out


def measure(
    run: str,
    steps: int,
    warmup: int,
    batch: int,
    device: str = "cpu",
    backend: str = "inductor",
    threads: int = THREADS,
) -> dict:
    preset, shape, mode = parse_run(run)
    if device == "cpu":
        keep_malloc_arenas(mode)
    import torch

    torch.set_num_threads(threads)
    dev = Device(device)
    model, step = build(preset, shape, mode, batch, device, backend)
    for _ in range(warmup):
        step()
    dev.sync()
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    dev.sync()
    dt = time.perf_counter() - t0
    peak = dev.peak_memory_GiB()
    # counted after the timing; on an eager twin of a compiled model (compiled code hides its operations)
    compiled = mode.endswith("-compile")
    gflop = step_gflop(build(preset, shape, mode.removesuffix("-compile"), batch, device)[1] if compiled else step)
    img_per_s = batch * steps / dt
    return {
        "preset": preset, "input": f"{shape[0]}x{shape[1]}", "mode": mode, "batch": batch, "steps": steps,
        "device": dev.type, "threads": threads, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "img_per_s": round(img_per_s, 2), "peak_memory_GiB": round(peak, 2),
        "gflop_per_img": round(gflop / batch, 2), "achieved_GFLOPs": round(gflop / batch * img_per_s, 1),
        "final_loss": round(losses[-1], 4),
        "allocator": allocator() if dev.type == "cpu" else "cuda",
        "load_1m": round(os.getloadavg()[0], 1),  # other processes on the machine during the run
    }  # fmt: skip


def profile(run: str, batch: int) -> None:
    preset, shape, mode = parse_run(run)
    keep_malloc_arenas(mode)
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(THREADS)
    _, step = build(preset, shape, mode, batch)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def with_fractions(result: dict, peaks: dict[str, float]) -> dict:
    """Add the step's achieved GFLOP/s as a fraction of the machine's measured bf16 / fp32 matmul rate."""
    out = dict(result)
    for name in ("bf16", "fp32"):
        peak = peaks.get(f"{name}_matmul_GFLOPs")
        if peak:
            out[f"fraction_of_{name}_matmul"] = round(result["achieved_GFLOPs"] / peak, 4)
    return out


def write(
    results: list[dict], peaks: dict[str, float], device: str, threads: int = THREADS, stem: str | None = None
) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": cpu_model(), "threads": threads, "cpus": os.cpu_count(), "device": device,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "measured_throughput": peaks}  # fmt: skip
    stem = stem or ("hvae_speed" if device == "cpu" else f"hvae_speed_{device}")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    memory = "peak RSS (GiB)" if device == "cpu" else "peak GPU memory (GiB)"
    lines = [
        f"# HVAE training speed ({device}, {threads} threads, batch 32, forward + backward + AdamW)",
        "",
        f"Written by `python benchmarks/hvae_speed.py --device {device} --threads {threads}` on {meta['machine']} ({meta['date']}). "
        "Modes change execution, not the model.",
        "",
        "This machine's measured throughput (GFLOP/s): "
        + ", ".join(f"{k.removesuffix('_GFLOPs').replace('_', ' ')} {v:g}" for k, v in peaks.items())
        + ". A step's fraction is its achieved GFLOP/s over the bf16 matmul figure.",
        "",
        f"| preset | input | mode | params (M) | img/s | {memory} | GFLOP/img | GFLOP/s | of bf16 matmul "
        "| allocator | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['mode']} | {r['params_M']} | {r['img_per_s']} "
            f"| {r['peak_memory_GiB']} | {r['gflop_per_img']} | {r['achieved_GFLOPs']} "
            f"| {r.get('fraction_of_bf16_matmul', 0):.1%} | {r['allocator']} | {r['load_1m']} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="runs preset:HxW:mode (default: the full table of the device)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="CPU threads of every run and of the micro-benchmark"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the -compile modes")
    parser.add_argument("--profile", metavar="RUN")
    parser.add_argument("--child", metavar="RUN", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--out", help="results file stem (default hvae_speed, hvae_speed_cuda on CUDA)")
    args = parser.parse_args()
    if args.profile:
        return profile(args.profile, args.batch)
    if args.child:
        print(
            json.dumps(
                measure(args.child, args.steps, args.warmup, args.batch, args.device, args.backend, args.threads)
            )
        )
        return
    peaks = machine_throughput(args.device, args.threads)
    print(json.dumps({"measured_throughput_GFLOPs": peaks}), flush=True)
    runs = args.only or DEFAULT_RUNS.get(args.device.split(":")[0], DEFAULT_RUNS["cpu"])
    results = []
    for run in runs:
        cmd = [sys.executable, __file__, "--child", run, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--device", args.device, "--backend", args.backend,
               "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(parse_run(run)[2]))
        if out.returncode:
            raise SystemExit(f"{run} failed:\n{out.stderr[-3000:]}")
        result = with_fractions(json.loads(out.stdout.strip().splitlines()[-1]), peaks)
        print(json.dumps(result), flush=True)
        print(
            f"{run}: {result['img_per_s']} img/s, {result['achieved_GFLOPs']} GFLOP/s = "
            f"{result.get('fraction_of_bf16_matmul', 0):.1%} of this machine's bf16 matmul throughput",
            flush=True,
        )
        results.append(result)
        if not args.no_write:  # after every run: a long table interrupted still leaves its rows
            write(results, peaks, args.device.split(":")[0], args.threads, args.out)


if __name__ == "__main__":
    main()
