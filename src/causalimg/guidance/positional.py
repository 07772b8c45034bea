"""Pos-Seg-CFT (the paper's Eq. 2 and 3): soft areas per structure PER REGION from a frozen segmentor.

    pa^_{s,k}(x~) = sum_{(i,j)} R_k[i,j] * softmax(s(x~))_{s,ij} * pixel_area      (Eq. 2)
    L_Pos        = sum_s sum_k d(n(pa^_{s,k}), n(pa~_{s,k}))                         (Eq. 3)

R_1..R_K are the masks of whatever partitioner the run names (``inputs.regions``); the same
segmentor serves every region, other regions being masked out by R_k. n is the recorded
variable transform, the very normalisation of the parents. The measurement is
``VariableSchema.measure``, the one shared with the data and the metrics.
"""

from __future__ import annotations

from typing import Literal

import torch

import causalimg
from causalimg.core.guidance import GuidanceInputs
from causalimg.errors import ConfigError
from causalimg.guidance.base import (
    SoftAreaGuidance,
    SoftAreaGuidanceConfig,
    area_indices,
    normalise_with,
)
from causalimg.plugins.specs import GuidanceSpec


class PositionalSegmentorGuidanceConfig(SoftAreaGuidanceConfig):
    name: Literal["positional-segmentor"] = "positional-segmentor"


class PositionalSegmentorGuidance(SoftAreaGuidance):
    def measure(self, image: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        if inputs.regions.shape[1] != len(inputs.schema.regions):
            raise ConfigError(
                f"{inputs.regions.shape[1]} region masks but {len(inputs.schema.regions)} regions "
                f"{list(inputs.schema.regions)}"
            )
        areas = self.soft_areas(image, inputs.regions, inputs)  # (B, S*K)
        idx = area_indices(inputs)
        return normalise_with(areas, inputs.transform.low[idx], inputs.transform.high[idx])

    def target(self, parents: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        idx = area_indices(inputs).to(parents.device)
        return inputs.transform.normalise(parents).index_select(-1, idx)  # (B, S*K)

    def touched(self, intervened: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        idx = area_indices(inputs).to(intervened.device)
        return intervened.index_select(-1, idx)  # (B, S*K)


@causalimg.hookimpl
def causalimg_guidance_strategies() -> list[GuidanceSpec]:
    return [
        GuidanceSpec(
            name="positional-segmentor",
            config=PositionalSegmentorGuidanceConfig,
            factory=PositionalSegmentorGuidance.from_config,
            summary="Pos-Seg-CFT: regional soft areas per structure from a frozen segmentor (Eq. 2-3)",
        )
    ]
