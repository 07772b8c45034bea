"""Files that survive kill -9 and a full disk: the one way causalimg writes and reads its files.

Every writer goes through ``atomic_path``: the data goes to a temporary file beside the target,
is flushed and fsynced, renamed over the target, and the folder is fsynced, so a reader sees the
old file or the whole new one, never a torn one, even after a power cut. Tensors are stored as
safetensors only (numbers in its metadata): a pickle can run code when it is loaded.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from causalimg.errors import DataError, DiskFullError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: reading a config needs none
    from torch import Tensor, nn

NUMBERS_KEY = "numbers"  # safetensors metadata entry holding a state's plain numbers as JSON


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: Path, err: BaseException, need_bytes: int | None = None) -> DiskFullError:
    """The one message for running out of space while writing ``path``."""
    need = f"; it needs about {need_bytes / 2**20:.0f} MiB" if need_bytes else ""
    return DiskFullError(
        f"no space left on the device while writing {path} ({free_bytes(path) / 2**20:.0f} MiB free{need}); "
        f"free some space and rerun with --resume: finished stages and the last complete checkpoint are kept "
        f"({type(err).__name__}: {str(err)[:120]})"
    )


def is_disk_full(err: BaseException) -> bool:
    """An OSError for a full disk, or a library's error from a write that failed for lack of space."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and is_disk_full(cause)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the body returns it is fsynced and renamed onto ``path``.

    For writers that want a file name (``save_file``, ``savefig``). If the body raises, the
    temporary file is removed and ``path`` keeps its previous content; a full disk is a
    ``DiskFullError`` naming the file and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not valid JSON (a torn or foreign file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -- tensors -------------------------------------------------------------------------------------
def save_tensors(path: Path, state: Mapping[str, Tensor | int | float | bool]) -> None:
    """Save a flat state of tensors and plain numbers (kept in the metadata) as safetensors, atomically."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    numbers: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            # a copy: tied weights share memory, which safetensors refuses to write
            tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        elif isinstance(value, (bool, int, float)):
            numbers[key] = value
        else:
            raise TypeError(f"state entry {key!r} is a {type(value).__name__}; only tensors and numbers are saved")
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={NUMBERS_KEY: json.dumps(numbers)})


def _checked_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataError(
            f"{path}: weights are read from .safetensors files only; a {path.suffix or 'suffix-less'} file "
            "may hold a pickle that runs code when loaded, so it is refused"
        )
    if not path.is_file():
        raise DataError(f"{path}: weights file not found; was the stage that writes it interrupted?")
    return path


def load_tensors(path: Path) -> dict[str, Tensor | int | float | bool]:
    """Read a file written by :func:`save_tensors` (or any plain safetensors file)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = _checked_path(path)
    try:
        tensors: dict[str, Any] = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors.update(json.loads(metadata.get(NUMBERS_KEY, "{}")))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    return tensors


def load_module(module: nn.Module, path: Path, prefix: str = "") -> nn.Module:
    """Load safetensors weights into ``module`` strictly: every key present, every shape equal.

    With ``prefix`` only the keys under it are read (and the prefix stripped). A missing or
    unexpected key, or a tensor of another shape, is one ``DataError`` naming the file and tensor.
    """
    import torch

    state = {k: v for k, v in load_tensors(path).items() if isinstance(v, torch.Tensor)}
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise DataError(
            f"{path}: weights do not fit {type(module).__name__} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for key, tensor in own.items():
        if tensor.shape != state[key].shape:
            raise DataError(
                f"{path}: tensor {prefix}{key} has shape {tuple(state[key].shape)}, "
                f"{type(module).__name__} needs {tuple(tensor.shape)}"
            )
    module.load_state_dict(state)
    return module
