"""Region partitions and the one regional measurement shared by data, guidance and metrics.

A partitioner splits an image into K named, disjoint regions. The regional area of a structure is
``sum_ij R_k[i, j] * p_s[i, j] * pixel_area`` (the paper's Eq. 2): differentiable in ``p``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from einops import einsum


@runtime_checkable
class Partitioner(Protocol):
    """Splits images into named disjoint regions.

    ``masks`` returns float {0, 1} masks of shape (K, H, W); partitioners that need per-image
    information (``landmarks``) read it from ``metadata`` and raise a clear error without it.
    """

    region_names: tuple[str, ...]

    def masks(
        self, height: int, width: int, spacing_mm: float, metadata: Mapping[str, Any] | None = None
    ) -> torch.Tensor: ...


def batch_region_masks(
    partitioner: Partitioner,
    height: int,
    width: int,
    spacing_mm: float,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> torch.Tensor:
    """Region masks for a batch: (K, H, W) broadcastable as (1, K, H, W), or (B, K, H, W) per image."""
    if metadata is None:
        return partitioner.masks(height, width, spacing_mm)[None]
    return torch.stack([partitioner.masks(height, width, spacing_mm, m) for m in metadata])


def regional_areas(probs: torch.Tensor, regions: torch.Tensor, pixel_area_mm2: float) -> torch.Tensor:
    """Soft area of every class in every region, in mm^2.

    probs:   (B, C, H, W) class probabilities (or fractional masks)
    regions: (B or 1, K, H, W) region masks
    returns: (B, C, K)
    """
    regions = regions.to(probs.dtype).expand(probs.shape[0], -1, -1, -1)
    return einsum(probs, regions, "b c h w, b k h w -> b c k") * pixel_area_mm2


def variable_areas(
    probs: torch.Tensor, regions: torch.Tensor, pixel_area_mm2: float, labels: Sequence[int]
) -> torch.Tensor:
    """Area variables: the soft areas of the classes ``labels`` (the structures, in order) per region.

    probs: (B, C, H, W); regions: (B or 1, K, H, W); returns (B, S * K), structure-major, S = len(labels).
    """
    areas = regional_areas(probs, regions, pixel_area_mm2)  # (B, C, K)
    index = torch.tensor(list(labels), device=probs.device)
    return areas.index_select(1, index).flatten(1)  # (B, S*K)
