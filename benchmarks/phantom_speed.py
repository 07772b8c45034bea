"""Phantom generation throughput on ONE thread: images per second into the on-disk cache.

Generates a train split (drawing exogenous state, solving amplitudes, rasterising, rendering,
measuring parents, writing the .npy cache) at 32 x 192 and 64 x 384 pixels: the default
(axial thirds), per-image landmark regions (one partitioner call per image) and the
`cpu-confounded` preset. Reports images per wall-clock second and per CPU second of this process
(the latter is what one core delivers even when the machine is shared). Writes
benchmarks/results/phantom_speed.{json,md}.

Usage:
  python benchmarks/phantom_speed.py            # 3000 images at 32 x 192, 1000 at 64 x 384
  python benchmarks/phantom_speed.py --n 500
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy and torch load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from causalimg.config.loader import load_config  # noqa: E402
from causalimg.data.phantom import PhantomConfig, PhantomSource  # noqa: E402
from causalimg.data.phantom_confounds import ConfoundConfig  # noqa: E402
from causalimg.regions.axial import AxialPartitioner  # noqa: E402
from causalimg.regions.landmarks import LandmarkPartitioner  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BAR = 500.0  # images per second at 32 x 192 on one core


def measure(spacing_mm: float, n: int, variant: str = "axial-thirds") -> dict[str, float | int | str]:
    partitioner = LandmarkPartitioner() if variant == "landmarks" else AxialPartitioner()
    confounds = load_config("cpu-confounded").data.confounds if variant == "confounded" else ConfoundConfig()
    config = PhantomConfig(spacing_mm=spacing_mm, n_train=n, confounds=confounds)
    with tempfile.TemporaryDirectory() as root:
        source = PhantomSource(config, partitioner, Path(root))
        source.render_indices("train", range(8))  # warm-up: imports, allocator
        wall, cpu = time.perf_counter(), time.process_time()
        source.split("train")[0]  # first access generates and caches the whole split
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        size = sum(f.stat().st_size for f in Path(root).rglob("*.npy"))
    h, w = source.image_shape
    return {
        "shape": f"{h}x{w}",
        "variant": variant,
        "spacing_mm": spacing_mm,
        "images": n,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "images_per_wall_s": round(n / wall, 1),
        "images_per_cpu_s": round(n / cpu, 1),
        "cache_bytes_per_image": size // n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="images at 32 x 192 (a third of it at 64 x 384)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(0.5, args.n), measure(0.5, args.n, "landmarks"), measure(0.5, args.n, "confounded"),
            measure(0.25, max(args.n // 3, 64))]  # fmt: skip
    meta = {"machine": platform.processor() or platform.machine(), "threads": 1, "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2), "bar_images_per_s_32x192": BAR}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "phantom_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Phantom generation speed (one thread, into the on-disk cache)",
        "",
        f"Machine: {meta['cpus']} CPUs, 1-minute load average {meta['load_average_1min']} at the end "
        "(the machine is shared: per-CPU-second figures are what one core delivers).",
        "",
        "| image | phantom | images | wall s | images / wall s | images / CPU s | cache bytes / image |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['shape']} | {r['variant']} | {r['images']} | {r['wall_s']} | {r['images_per_wall_s']} "
            f"| {r['images_per_cpu_s']} | {r['cache_bytes_per_image']} |"
            for r in rows
        ),
        "",
        f"Bar: at least {BAR:g} images/s at 32 x 192 on one core.",
    ]
    (RESULTS / "phantom_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
