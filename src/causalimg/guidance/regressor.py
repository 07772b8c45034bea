"""Reg-CFT (Ribeiro et al. 2023): a frozen regressor must read the counterfactual parents off x~.

    L_Reg = sum_p d(q(x~)_p, n(pa~)_p)

q is the frozen regressor predicting every variable normalised by the recorded transform n.
It sees the whole image, so nothing tells it WHERE a regional change belongs: the baseline that
positional guidance improves on.
"""

from __future__ import annotations

from typing import Literal

import torch

import causalimg
from causalimg.core.guidance import GuidanceInputs
from causalimg.errors import ConfigError
from causalimg.guidance.base import GuidanceConfig, MeasurementGuidance
from causalimg.plugins.specs import GuidanceSpec


class RegressorGuidanceConfig(GuidanceConfig):
    name: Literal["regressor"] = "regressor"


class RegressorGuidance(MeasurementGuidance):
    predictor_field = "regressor"

    def measure(self, image: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        pred = self.predictor(image)  # (B, P) normalised
        if pred.shape[-1] != len(inputs.transform.names):
            raise ConfigError(
                f"the regressor predicts {pred.shape[-1]} values but the data has "
                f"{len(inputs.transform.names)} variables {list(inputs.transform.names)}"
            )
        return pred

    def target(self, parents: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        return inputs.transform.normalise(parents)  # (B, P)

    def touched(self, intervened: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        return intervened


@causalimg.hookimpl
def causalimg_guidance_strategies() -> list[GuidanceSpec]:
    return [
        GuidanceSpec(
            name="regressor",
            config=RegressorGuidanceConfig,
            factory=RegressorGuidance.from_config,
            summary="Reg-CFT: a frozen ResNet regressor must predict the counterfactual parents from x~",
        )
    ]
