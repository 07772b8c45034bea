"""The guidance contract: what a counterfactual fine-tuning objective sees and returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from causalimg.core.schema import VariableSchema
from causalimg.core.transform import VariableTransform


@dataclass
class GuidanceInputs:
    """Everything a strategy may look at for one fine-tuning batch.

    cf_image:   (B, 1, H, W) counterfactual x~, differentiable w.r.t. the image mechanism
    cf_parents: (B, P) counterfactual (target) parents in data units (mm^2)
    image:      (B, 1, H, W) factual x
    parents:    (B, P) factual parents in data units
    intervened: (B, P) bool, True where the variable was the target of do(.)
    regions:    (B or 1, K, H, W) region masks of the configured partitioner
    schema:     the data's variables: which columns are areas of which structure and region
    """

    cf_image: torch.Tensor
    cf_parents: torch.Tensor
    image: torch.Tensor
    parents: torch.Tensor
    intervened: torch.Tensor
    regions: torch.Tensor
    pixel_area_mm2: float
    transform: VariableTransform
    schema: VariableSchema


@dataclass(frozen=True)
class GuidancePredictors:
    """The frozen predictors fine-tuning may use. The evaluation segmentor is deliberately absent."""

    segmentor: nn.Module | None = None
    regressor: nn.Module | None = None


class GuidanceStrategy(nn.Module):
    """Base of guidance strategies: ``forward(inputs) -> {term name: scalar loss}``.

    Predictors are held frozen and in eval mode; ``train()`` on the strategy never unfreezes them.
    """

    def forward(self, inputs: GuidanceInputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> GuidanceStrategy:
        super().train(mode)
        for module in self.children():
            module.eval()
        return self
