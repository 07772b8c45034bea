"""Frozen predictors: weights from safetensors only, no gradients, eval mode.

Freezing takes both ``requires_grad_(False)`` (no weight receives a gradient) and ``eval()``
(BatchNorm statistics and dropout do not move); a plain attribute assignment freezes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from torch import nn

from causalimg.io import load_module

M = TypeVar("M", bound=nn.Module)


def freeze(module: M) -> M:
    """Stop every parameter from training and put the module in eval mode; returns it."""
    module.requires_grad_(False)
    module.eval()
    return module


def load_frozen(module: M, path: Path) -> M:
    """The module with the weights of ``path`` (safetensors only, strictly), frozen: how fine-tuning
    and evaluation get their predictors."""
    load_module(module, path)
    return freeze(module)
