"""Frozen predictors: weights from safetensors only, no gradients, eval mode.

Freezing takes both ``requires_grad_(False)`` (no weight receives a gradient) and ``eval()``
(BatchNorm statistics and dropout do not move); a plain attribute assignment freezes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from causalimg.errors import DataError

M = TypeVar("M", bound=nn.Module)


def freeze(module: M) -> M:
    """Stop every parameter from training and put the module in eval mode; returns it."""
    module.requires_grad_(False)
    module.eval()
    return module


def save_weights(module: nn.Module, path: Path) -> None:
    """Write the module's state (parameters and buffers) as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(path)


def load_weights(module: M, path: Path) -> M:
    """Load safetensors weights into ``module`` strictly; a missing or mismatched file is a DataError."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataError(f"predictor weights {str(path)!r} must be a .safetensors file (pickles are refused)")
    if not path.is_file():
        raise DataError(f"predictor weights {str(path)!r} do not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DataError(f"predictor weights {str(path)!r} are not a readable safetensors file: {err}") from err
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise DataError(f"predictor weights {str(path)!r} do not fit {type(module).__name__}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"predictor weights {str(path)!r} do not fit {type(module).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return module


def load_frozen(module: M, path: Path) -> M:
    """``freeze(load_weights(module, path))``: how fine-tuning and evaluation get their predictors."""
    return freeze(load_weights(module, path))
