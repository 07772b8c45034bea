"""Seg-CFT (Xia et al. 2025): global soft areas of each structure read by a frozen segmentor.

    A_s(x~) = sum_ij softmax(s(x~))_{s,ij} * pixel_area          (whole image)
    L_Seg   = sum_s d(n_s(A_s(x~)), n_s(sum_k pa~_{s,k}))

The target of structure s is the sum of its regional counterfactual parents. n_s maps a global
area to [-1, 1] with the range [sum_k low_{s,k}, sum_k high_{s,k}] of the recorded transform, so
the loss has the same scale at any resolution or unit. Knows how much, not where.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, reduce

import causalimg
from causalimg.core.guidance import GuidanceInputs
from causalimg.guidance.base import (
    SoftAreaGuidance,
    SoftAreaGuidanceConfig,
    area_indices,
    normalise_with,
)
from causalimg.plugins.specs import GuidanceSpec


class SegmentorGuidanceConfig(SoftAreaGuidanceConfig):
    name: Literal["segmentor"] = "segmentor"


class SegmentorGuidance(SoftAreaGuidance):
    def _structure_sums(self, values: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        """(B, P) per-variable values -> (B, S) per-structure sums over regions."""
        idx = area_indices(inputs).to(values.device)
        regional = rearrange(values.index_select(-1, idx), "b (s k) -> b s k", s=len(inputs.schema.structures))
        return reduce(regional, "b s k -> b s", "sum")

    def _normalise(self, areas: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        t = inputs.transform
        low = self._structure_sums(t.low[None], inputs)[0]  # (S,)
        high = self._structure_sums(t.high[None], inputs)[0]
        return normalise_with(areas, low, high)

    def measure(self, image: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        whole = torch.ones(1, 1, *image.shape[-2:], dtype=image.dtype, device=image.device)  # one region: all
        areas = self.soft_areas(image, whole, inputs)  # (B, S)
        return self._normalise(areas, inputs)

    def target(self, parents: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        return self._normalise(self._structure_sums(parents, inputs), inputs)

    def touched(self, intervened: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        return self._structure_sums(intervened.float(), inputs) > 0  # (B, S): any region intervened


@causalimg.hookimpl
def causalimg_guidance_strategies() -> list[GuidanceSpec]:
    return [
        GuidanceSpec(
            name="segmentor",
            config=SegmentorGuidanceConfig,
            factory=SegmentorGuidance.from_config,
            summary="Seg-CFT: soft areas of each structure over the whole image from a frozen segmentor",
        )
    ]
