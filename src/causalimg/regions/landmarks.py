"""Per-image anatomical segments: boundaries in mm read from each sample's metadata.

Where the proximal / mid / distal split lies differs from patient to patient (it follows branch
points, not equal lengths), so each sample carries its own cut points, e.g. in a folder data
set's ``.npz`` as ``boundaries_mm = [31.5, 70.2]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import model_validator

import causalimg
from causalimg.errors import DataError
from causalimg.plugins.specs import PartitionerSpec
from causalimg.regions.axial import THIRDS, axial_masks
from causalimg.strict import StrictModel


class LandmarksConfig(StrictModel):
    """Axial segments whose boundaries come from each sample's metadata entry ``key``."""

    name: Literal["landmarks"] = "landmarks"
    names: tuple[str, ...] = THIRDS
    key: str = "boundaries_mm"

    @model_validator(mode="after")
    def _check(self) -> LandmarksConfig:
        if len(self.names) < 2 or len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be at least two unique segment names, got {self.names}")
        return self


class LandmarkPartitioner:
    """Axial segments cut at per-image landmark positions (mm from the proximal end)."""

    def __init__(self, region_names: tuple[str, ...] = THIRDS, key: str = "boundaries_mm"):
        self.region_names = tuple(region_names)
        self.key = key

    @classmethod
    def from_config(cls, config: LandmarksConfig) -> LandmarkPartitioner:
        return cls(config.names, config.key)

    def masks(
        self, height: int, width: int, spacing_mm: float, metadata: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        where = f" (sample {metadata['source']})" if metadata and "source" in metadata else ""
        if metadata is None or self.key not in metadata:
            raise DataError(
                f"partitioner 'landmarks' needs per-image metadata {self.key!r} with "
                f"{len(self.region_names) - 1} boundaries in mm{where}; none was given"
            )
        try:
            cuts = [float(v) for v in torch.as_tensor(metadata[self.key], dtype=torch.float64).flatten()]
        except (TypeError, ValueError) as err:
            raise DataError(f"metadata {self.key!r}{where} is not a list of numbers: {metadata[self.key]!r}") from err
        length = width * spacing_mm
        if len(cuts) != len(self.region_names) - 1:
            raise DataError(
                f"metadata {self.key!r}{where} has {len(cuts)} boundaries; regions {self.region_names} need "
                f"{len(self.region_names) - 1}"
            )
        if any(c <= 0 or c >= length for c in cuts) or any(b <= a for a, b in itertools.pairwise(cuts)):
            raise DataError(f"metadata {self.key!r}{where} = {cuts} must increase strictly inside (0, {length:g}) mm")
        return axial_masks(cuts, height, width, spacing_mm)


@causalimg.hookimpl
def causalimg_region_partitioners() -> list[PartitionerSpec]:
    return [
        PartitionerSpec(
            name="landmarks",
            config=LandmarksConfig,
            factory=LandmarkPartitioner.from_config,
            summary="Axial segments cut at per-image landmark boundaries from sample metadata",
        )
    ]
