"""Files that survive kill -9 and a full disk: atomic writes, checkpoint folders, safe weight loading.

A checkpoint is written into ``checkpoints/.tmp-step_<n>`` and renamed to ``checkpoints/step_<n>``
only when complete; its ``trainer_state.json`` is written last. A folder without that file, or a
leftover temporary folder, is never taken for a checkpoint. Weights are read from safetensors only:
``.bin``/``.pt``/``.pkl`` files can run code when unpickled and are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from causalimg.errors import DataError, TrainingError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_STEP_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so a reader sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: Path, state: Mapping[str, Tensor | int | float | bool]) -> None:
    """Save a flat state dict of tensors and Python numbers as safetensors (numbers in metadata)."""
    tensors: dict[str, Tensor] = {}
    numbers: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            # a copy: tied weights share memory, which safetensors refuses to write
            tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        elif isinstance(value, (bool, int, float)):
            numbers[key] = value
        else:
            raise TypeError(f"state entry {key!r} is a {type(value).__name__}; only tensors and numbers are saved")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"numbers": json.dumps(numbers)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_safetensors_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataError(
            f"{path}: weights are read from .safetensors files only; a {path.suffix or 'suffix-less'} file "
            "may hold a pickle that runs code when loaded, so it is refused"
        )
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    return path


def load_tensors(path: Path) -> dict[str, Tensor | int | float | bool]:
    """Read a file written by :func:`atomic_save_tensors` (or any plain safetensors file)."""
    path = _check_safetensors_path(path)
    try:
        tensors: dict[str, Any] = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors.update(json.loads(metadata.get("numbers", "{}")))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    return tensors


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors weights file into ``model``; key mismatches name the file and the keys."""
    state = {k: v for k, v in load_tensors(path).items() if isinstance(v, Tensor)}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise DataError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise DataError(
            f"{path}: shapes differ for {wrong[:5]} (file {tuple(state[wrong[0]].shape)}, "
            f"model {tuple(own[wrong[0]].shape)})"
        )
    model.load_state_dict(state)


def check_writable(out_dir: Path, need_bytes: int) -> None:
    """Fail before training when ``out_dir`` cannot take a file or lacks room for the checkpoints."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / ".write-probe", b"causalimg")
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
    _fsync_dir(final.parent)
    for stale in list_checkpoints(final.parent.parent)[:-keep]:
        doomed = stale.with_name(f"{_TMP_PREFIX}{stale.name}")
        os.replace(stale, doomed)  # a kill mid-delete leaves a temporary folder, never a torn checkpoint
        shutil.rmtree(doomed)


def write_state(tmp: Path, state: Mapping[str, Any]) -> None:
    atomic_write_json(tmp / STATE_FILE, dict(state))


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable trainer state ({err})") from err


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


__all__ = [
    "CHECKPOINTS",
    "EMA_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_writable",
    "checkpoint_step",
    "list_checkpoints",
    "load_tensors",
    "load_weights",
    "model_bytes",
    "publish",
    "read_state",
    "remove_partial",
    "staging_dir",
    "write_state",
]
