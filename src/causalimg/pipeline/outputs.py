"""Checksums of what a stage wrote: recorded when it finishes, verified whenever it is skipped.

A finished stage's ``done.json`` lists every file of its folder (checkpoints aside) with its size
and digest. A run that finds a stage complete verifies them before trusting it, so a weights file
swapped or deleted after the run is named instead of silently reused. Files up to 256 MiB are
hashed whole (sha256), weights included; larger ones (a paper-sized image cache) by their size and
64 sampled blocks, which stays cheap at any size and catches a file replaced or regenerated,
though not an edit of a few bytes between the samples.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

WHOLE_BYTES = 256 * 2**20  # files up to this size are hashed whole
BLOCK = 64 * 1024
SAMPLES = 64  # sampled blocks of a larger file, evenly spread, first and last included
SKIPPED_DIRS = {"checkpoints", "logs"}  # rewritten by a resumed stage; never read downstream


def digest(path: Path) -> str:
    """sha256 of the file, or ``sampled:`` sha256 of its size and SAMPLES blocks for a large one."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= WHOLE_BYTES:
            for chunk in iter(lambda: handle.read(2**20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        block = min(BLOCK, size)
        for i in range(SAMPLES):
            handle.seek((size - block) * i // (SAMPLES - 1))
            h.update(handle.read(block))
    return "sampled:" + h.hexdigest()


def record(stage_dir: Path, ignore: set[str]) -> dict[str, dict[str, Any]]:
    """Relative path -> {size, digest} of every file under ``stage_dir`` (but ``ignore`` and the skipped folders)."""
    files: dict[str, dict[str, Any]] = {}
    for root, dirs, names in os.walk(stage_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in sorted(names):
            path = Path(root) / name
            rel = str(path.relative_to(stage_dir))
            if rel in ignore or name.startswith("."):
                continue
            files[rel] = {"size": path.stat().st_size, "digest": digest(path)}
    return files


def changed(stage_dir: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """The recorded files that are missing or differ now (cheap size check first)."""
    problems = []
    for rel, expected in files.items():
        path = stage_dir / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected["size"] or digest(path) != expected["digest"]:
            problems.append(f"{path} changed")
    return problems
