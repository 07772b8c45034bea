"""Peak memory of the data side at the paper's size: the cached phantom streamed for one epoch.

Builds (or reuses) the on-disk phantom cache at 64 x 384 (``spacing_mm`` 0.25), then reads the
training split once through a shuffled DataLoader as training does. A sampler thread reads
/proc/<pid>/status of this process and its DataLoader workers every 0.2 s. The bar is on
anonymous memory (RssAnon: what the process itself holds) summed over processes: < 4 GB.
File-backed resident pages (RssFile: mapped libraries; the cache itself is written and read with
plain positioned I/O, so its pages stay in the kernel's page cache, outside every process) are
reported too, and so is the total.

Usage:
  python benchmarks/data_memory.py --root /big/disk/phantom         # paper size: 49,292 train images (~12 GB cache)
  python benchmarks/data_memory.py --count 2000 --out /tmp/mem       # a quick check
Writes benchmarks/results/data_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proc_memory import children, status
from torch.utils.data import DataLoader

from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.regions.axial import AxialPartitioner

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1024**3
BAR_GB = 4.0


class PeakMemory:
    """Peak per-field sums over this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            procs = [status(me)] + [status(c) for c in children(me)]
            for key in self.peak:
                self.peak[key] = max(self.peak[key], sum(p.get(key, 0) for p in procs))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def measure(count: int, root: Path, batch_size: int, workers: int) -> dict[str, Any]:
    config = PhantomConfig(spacing_mm=0.25, n_train=count, n_val=1, n_test=1)
    source = PhantomSource(config, AxialPartitioner(), root)
    dataset = source.split("train")
    with PeakMemory() as generation:
        began = time.perf_counter()
        dataset[0]  # the first read writes the cache (streaming, chunk by chunk) unless it exists
        generate_s = time.perf_counter() - began
    cache_bytes = sum(p.stat().st_size for p in source.cache_dir.rglob("*.npy"))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False)
    images = 0
    with PeakMemory() as streaming:
        began = time.perf_counter()
        for batch in loader:
            images += batch["image"].shape[0]
        stream_s = time.perf_counter() - began
    shape = tuple(dataset[0]["image"].shape)
    return {
        "count": count, "image_shape": shape, "batch_size": batch_size, "workers": workers,
        "cache_gb": cache_bytes / GB, "generate_s": generate_s, "stream_s": stream_s, "images_read": images,
        "images_per_s": images / stream_s,
        "generation_peak_gb": {k: v / GB for k, v in generation.peak.items()},
        "streaming_peak_gb": {k: v / GB for k, v in streaming.peak.items()},
        "bar_gb": BAR_GB,
        "ok": max(generation.peak["RssAnon"], streaming.peak["RssAnon"]) / GB < BAR_GB and images == count,
        "load_average_1min_at_end": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def markdown(r: dict[str, Any], argv: Sequence[str]) -> str:
    def row(name: str, peak: dict[str, float]) -> str:
        return f"| {name} | {peak['RssAnon']:.2f} | {peak['RssFile']:.2f} | {peak['VmRSS']:.2f} |"

    return "\n".join(
        [
            "# Data-side memory: the cached phantom streamed for one epoch",
            "",
            f"Command: `{' '.join(['python benchmarks/data_memory.py', *argv])}`; {r['count']} training images of "
            f"{r['image_shape'][1]} x {r['image_shape'][2]}, cache {r['cache_gb']:.2f} GB on disk, batch {r['batch_size']}, "
            f"{r['workers']} DataLoader workers; cache written in {r['generate_s']:.0f} s, epoch read in {r['stream_s']:.0f} s "
            f"({r['images_per_s']:.0f} images/s); 1-minute load average {r['load_average_1min_at_end']:.1f} (shared machine).",
            "",
            "| phase | peak anonymous GB (all processes) | peak file-backed GB (all processes) | peak total RSS GB |",
            "|---|---|---|---|",
            row("write the cache", r["generation_peak_gb"]),
            row("stream one epoch", r["streaming_peak_gb"]),
            "",
            f"Bar: anonymous memory < {r['bar_gb']:g} GB: {'met' if r['ok'] else 'NOT met'}. The cache is read with "
            "positioned reads (no memory map), so its pages are not part of any process's resident set.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=49_292, help="training images (paper: 49,292)")
    parser.add_argument("--root", type=Path, help="cache folder to use and keep (default: a temporary one, removed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="causalimg-data-memory-"))
    try:
        result = measure(args.count, root, args.batch_size, args.workers)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, sys.argv[1:] if argv is None else argv)
    (args.out / "data_memory.md").write_text(text)
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
