"""Checkpoint folders that survive kill -9 and a full disk.

A checkpoint is written into ``checkpoints/.tmp-step_<n>`` and renamed to ``checkpoints/step_<n>``
only when complete; its ``trainer_state.json`` is written last. A folder without that file, or a
leftover temporary folder, is never taken for a checkpoint. Files inside are written with
``causalimg.io`` (atomic, safetensors only).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from causalimg import io
from causalimg.errors import DataError, TrainingError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_STEP_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


def check_writable(out_dir: Path, need_bytes: int) -> None:
    """Fail before training when ``out_dir`` cannot take a file or lacks room for the checkpoints."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        io.atomic_write_bytes(out_dir / ".write-probe", b"causalimg")
        (out_dir / ".write-probe").unlink()
    except OSError as err:
        raise TrainingError(f"output directory {out_dir} is not writable: {err.strerror or err}") from err
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise TrainingError(
            f"output directory {out_dir} has {free / 2**20:.0f} MiB free; its checkpoints need about "
            f"{need_bytes / 2**20:.0f} MiB (lower train.keep_checkpoints or free space)"
        )


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.removeprefix(_STEP_PREFIX))


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of ``out_dir``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.startswith(_STEP_PREFIX)
        and p.name.removeprefix(_STEP_PREFIX).isdigit()
        and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def remove_partial(out_dir: Path) -> None:
    """Delete temporary folders left by a process killed while writing a checkpoint."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                shutil.rmtree(path)


def staging_dir(out_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder to write into, final folder name) for the checkpoint of ``step``."""
    root = Path(out_dir) / CHECKPOINTS
    name = f"{_STEP_PREFIX}{step:08d}"
    return root / f"{_TMP_PREFIX}{name}", root / name


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a finished checkpoint into place, then drop the oldest beyond ``keep``."""
    os.replace(tmp, final)  # atomic: the folder appears complete or not at all
    io.fsync_dir(final.parent)
    for stale in list_checkpoints(final.parent.parent)[:-keep]:
        doomed = stale.with_name(f"{_TMP_PREFIX}{stale.name}")
        os.replace(stale, doomed)  # a kill mid-delete leaves a temporary folder, never a torn checkpoint
        shutil.rmtree(doomed)


def write_state(tmp: Path, state: Mapping[str, Any]) -> None:
    io.atomic_write_json(tmp / STATE_FILE, dict(state))


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable trainer state ({err})") from err


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
