"""Grid partition: rows x cols tiles named ``r<row>c<col>``, for example inner / outer bands by row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from einops import rearrange
from pydantic import PositiveInt

import causalimg
from causalimg.plugins.specs import PartitionerSpec
from causalimg.strict import StrictModel


class GridConfig(StrictModel):
    """Equal tiles: ``rows`` across the vessel, ``cols`` along it."""

    name: Literal["grid"] = "grid"
    rows: PositiveInt = 2
    cols: PositiveInt = 3


class GridPartitioner:
    """Tiles by pixel centre: a pixel belongs to the tile holding its centre."""

    def __init__(self, rows: int = 2, cols: int = 3):
        self.rows, self.cols = rows, cols
        self.region_names = tuple(f"r{r}c{c}" for r in range(rows) for c in range(cols))

    @classmethod
    def from_config(cls, config: GridConfig) -> GridPartitioner:
        return cls(config.rows, config.cols)

    def masks(
        self, height: int, width: int, spacing_mm: float, metadata: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        row = ((torch.arange(height) + 0.5) * self.rows / height).floor().long()  # (H,) tile row
        col = ((torch.arange(width) + 0.5) * self.cols / width).floor().long()  # (W,) tile column
        tile = row[:, None] * self.cols + col[None, :]  # (H, W)
        onehot = torch.nn.functional.one_hot(tile, self.rows * self.cols)  # (H, W, K)
        return rearrange(onehot, "h w k -> k h w").to(torch.float32).contiguous()


@causalimg.hookimpl
def causalimg_region_partitioners() -> list[PartitionerSpec]:
    return [
        PartitionerSpec(
            name="grid",
            config=GridConfig,
            factory=GridPartitioner.from_config,
            summary="rows x cols tiles named r<row>c<col>",
        )
    ]
