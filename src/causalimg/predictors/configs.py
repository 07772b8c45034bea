"""The predictors' config models, apart from their networks so that reading a config imports no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from causalimg.strict import StrictModel


class SegmentorConfig(StrictModel):
    """U-Net size: one width per level; the image is halved ``len(widths) - 1`` times."""

    widths: tuple[PositiveInt, ...] = Field((16, 32, 64), min_length=2)
    blocks: PositiveInt = 1  # residual blocks per level and side
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class RegressorConfig(StrictModel):
    """Which timm architecture; trained from scratch on one channel (no downloads)."""

    model: str = "resnet18"  # a timm model name
    loss: Literal["l1", "l2"] = "l2"
