"""A causalimg region partitioner: consecutive segments along the vessel with lengths in mm.

Anatomical segments of a coronary artery are not thirds: the proximal LAD is longer than its
distal part. This partitioner cuts the image along its width (proximal at the left) after the
given lengths; the last region takes whatever length remains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from einops import repeat
from pydantic import Field, PositiveFloat, model_validator

import causalimg
from causalimg.errors import ConfigError
from causalimg.plugins.specs import PartitionerSpec
from causalimg.strict import StrictModel


class UnequalAxialConfig(StrictModel):
    """Region names from proximal to distal and the lengths of all but the last region."""

    name: Literal["unequal-axial"] = "unequal-axial"
    region_names: tuple[str, ...] = Field(("proximal", "mid", "distal"), min_length=2)
    # 40% / 35% of a 96 mm segment (192 px at 0.5 mm); the distal region takes the last 25%
    lengths_mm: tuple[PositiveFloat, ...] = (38.4, 33.6)

    @model_validator(mode="after")
    def _one_length_per_cut(self) -> UnequalAxialConfig:
        if len(self.lengths_mm) != len(self.region_names) - 1:
            raise ValueError(
                f"lengths_mm needs {len(self.region_names) - 1} lengths (all regions but the last, "
                f"{self.region_names[-1]!r}, which takes the rest), got {len(self.lengths_mm)}"
            )
        if len(set(self.region_names)) != len(self.region_names):
            raise ValueError(f"region_names must be distinct, got {self.region_names}")
        return self


class UnequalAxialPartitioner:
    """Splits columns by their centre's distance from the proximal end (left edge) in mm."""

    def __init__(self, region_names: tuple[str, ...], lengths_mm: tuple[float, ...]):
        self.region_names = tuple(region_names)
        self.lengths_mm = tuple(lengths_mm)

    @classmethod
    def from_config(cls, config: UnequalAxialConfig) -> UnequalAxialPartitioner:
        return cls(config.region_names, config.lengths_mm)

    def masks(
        self, height: int, width: int, spacing_mm: float, metadata: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """(K, H, W) float32 {0, 1} masks; every pixel belongs to exactly one region."""
        image_mm = width * spacing_mm
        if sum(self.lengths_mm) >= image_mm:
            raise ConfigError(
                f"regions.lengths_mm = {list(self.lengths_mm)} sum to {sum(self.lengths_mm):g} mm, but the "
                f"image is only {image_mm:g} mm long ({width} px x {spacing_mm:g} mm); "
                f"region {self.region_names[-1]!r} would be empty"
            )
        cuts = torch.tensor(self.lengths_mm, dtype=torch.float64).cumsum(0)  # (K-1,) mm from the left
        centres = (torch.arange(width, dtype=torch.float64) + 0.5) * spacing_mm  # (W,)
        region_of_column = torch.bucketize(centres, cuts, right=True)  # (W,) in [0, K)
        onehot = torch.nn.functional.one_hot(region_of_column, len(self.region_names))  # (W, K)
        return repeat(onehot.to(torch.float32), "w k -> k h w", h=height)


@causalimg.hookimpl
def causalimg_region_partitioners() -> list[PartitionerSpec]:
    return [
        PartitionerSpec(
            name="unequal-axial",
            config=UnequalAxialConfig,
            factory=UnequalAxialPartitioner.from_config,
            summary="Consecutive segments along the vessel with lengths in mm",
        )
    ]
