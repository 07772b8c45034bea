"""Axial partitions: segments along the vessel (image width), proximal at the left.

``axial-thirds`` is the paper's proximal / mid / distal split by equal length; ``axial`` takes
either length fractions or boundaries in millimetres, with a name per segment. A pixel belongs to
the segment that holds its centre, so masks are disjoint and cover the image at any spacing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import model_validator

import causalimg
from causalimg.errors import DataError
from causalimg.plugins.specs import PartitionerSpec
from causalimg.strict import StrictModel

THIRDS: tuple[str, ...] = ("proximal", "mid", "distal")


def axial_masks(boundaries_mm: Sequence[float], height: int, width: int, spacing_mm: float) -> torch.Tensor:
    """(K, H, W) float32 {0, 1} masks of the K = len(boundaries) + 1 segments split at ``boundaries_mm``."""
    centres = (torch.arange(width, dtype=torch.float64) + 0.5) * spacing_mm  # (W,)
    segment = torch.bucketize(centres, torch.tensor(list(boundaries_mm), dtype=torch.float64), right=True)
    k = len(boundaries_mm) + 1
    onehot = segment[None, :] == torch.arange(k)[:, None]  # (K, W)
    return onehot[:, None, :].expand(k, height, width).to(torch.float32).contiguous()


class AxialThirdsConfig(StrictModel):
    """Proximal / mid / distal thirds of equal length (the paper's partition)."""

    name: Literal["axial-thirds"] = "axial-thirds"


class AxialConfig(StrictModel):
    """Axial segments given by length fractions OR by boundaries in mm from the proximal end.

    With neither, the segments have equal lengths.
    """

    name: Literal["axial"] = "axial"
    names: tuple[str, ...] = THIRDS
    fractions: tuple[float, ...] | None = None  # one per segment, summing to 1
    boundaries_mm: tuple[float, ...] | None = None  # len(names) - 1 increasing cut points

    @model_validator(mode="after")
    def _check(self) -> AxialConfig:
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"names must be unique and non-empty, got {self.names}")
        if self.fractions is not None and self.boundaries_mm is not None:
            raise ValueError("give 'fractions' or 'boundaries_mm', not both (neither: equal lengths)")
        if self.fractions is not None:
            if len(self.fractions) != len(self.names):
                raise ValueError(f"fractions has {len(self.fractions)} entries for {len(self.names)} names")
            if min(self.fractions) <= 0 or abs(sum(self.fractions) - 1.0) > 1e-6:
                raise ValueError(f"fractions must be positive and sum to 1, got {self.fractions}")
        if self.boundaries_mm is not None:
            b = self.boundaries_mm
            if len(b) != len(self.names) - 1:
                raise ValueError(f"boundaries_mm needs {len(self.names) - 1} cut points for {len(self.names)} names")
            if any(x <= 0 for x in b) or any(b2 <= b1 for b1, b2 in itertools.pairwise(b)):
                raise ValueError(f"boundaries_mm must be positive and strictly increasing, got {b}")
        return self


class AxialPartitioner:
    """Segments along the width, by fractions of the length or by fixed millimetre boundaries."""

    def __init__(
        self,
        region_names: Sequence[str] = THIRDS,
        fractions: Sequence[float] | None = None,
        boundaries_mm: Sequence[float] | None = None,
    ):
        self.region_names = tuple(region_names)
        if fractions is None and boundaries_mm is None:
            fractions = [1.0 / len(self.region_names)] * len(self.region_names)
        self.fractions = None if fractions is None else tuple(fractions)
        self.boundaries_mm = None if boundaries_mm is None else tuple(boundaries_mm)

    @classmethod
    def from_config(cls, config: AxialThirdsConfig | AxialConfig) -> AxialPartitioner:
        if isinstance(config, AxialThirdsConfig):
            return cls(THIRDS)
        return cls(config.names, config.fractions, config.boundaries_mm)

    def masks(
        self, height: int, width: int, spacing_mm: float, metadata: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        length = width * spacing_mm
        if self.fractions is not None:
            cuts = torch.cumsum(torch.tensor(self.fractions, dtype=torch.float64), 0)[:-1] * length
            return axial_masks(cuts.tolist(), height, width, spacing_mm)
        assert self.boundaries_mm is not None
        if self.boundaries_mm[-1] >= length:
            raise DataError(
                f"axial boundaries_mm {self.boundaries_mm} reach past the image length {length:g} mm "
                f"({width} pixels x {spacing_mm:g} mm): segment {self.region_names[-1]!r} would be empty"
            )
        return axial_masks(self.boundaries_mm, height, width, spacing_mm)


@causalimg.hookimpl
def causalimg_region_partitioners() -> list[PartitionerSpec]:
    return [
        PartitionerSpec(
            name="axial-thirds",
            config=AxialThirdsConfig,
            factory=AxialPartitioner.from_config,
            summary="Proximal / mid / distal thirds of equal length along the vessel",
        ),
        PartitionerSpec(
            name="axial",
            config=AxialConfig,
            factory=AxialPartitioner.from_config,
            summary="Named axial segments by length fractions or millimetre boundaries",
        ),
    ]
