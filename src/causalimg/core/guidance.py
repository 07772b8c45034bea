"""The guidance contract: what a counterfactual fine-tuning objective sees and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from causalimg.core.mechanism import Exogenous, GuidedPrediction
from causalimg.core.schema import VariableSchema
from causalimg.core.transform import VariableTransform
from causalimg.errors import ConfigError

if TYPE_CHECKING:
    from causalimg.core.scm import DSCM


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


class SamplingGuidance:
    """Guidance terms applied while the image mechanism predicts, with nothing fine-tuned.

    The counterfactual is ``predict_guided`` of the abducted state under the counterfactual parents,
    steered by the terms' loss on the image each step heads for. Terms see the same
    ``GuidanceInputs`` as in fine-tuning; their batch mean is taken back to a per-image sum, so the
    push on one image does not depend on the batch size.
    """

    def __init__(self, strategies: list[GuidanceStrategy], schema: VariableSchema, pixel_area_mm2: float, scale: float):
        self.strategies = [strategy.eval() for strategy in strategies]
        self.schema, self.pixel_area_mm2, self.scale = schema, float(pixel_area_mm2), float(scale)

    def predict(
        self,
        dscm: DSCM,
        exogenous: Exogenous,
        x: torch.Tensor,
        pa: torch.Tensor,
        pa_cf: torch.Tensor,
        intervened: torch.Tensor,
        regions: torch.Tensor,
    ) -> torch.Tensor:
        """x~ (B, 1, H, W) from the state abducted from x (B, 1, H, W) under pa (B, P), for parents
        pa_cf (B, P); intervened (B, P) marks the targets of do(.), regions (B or 1, K, H, W)."""
        image = dscm.image
        if not isinstance(image, GuidedPrediction):
            raise ConfigError(f"{type(image).__name__} cannot be guided at sampling time (it has no predict_guided)")

        def guide(estimate: torch.Tensor) -> torch.Tensor:
            inputs = GuidanceInputs(
                cf_image=estimate, cf_parents=pa_cf, image=x, parents=pa, intervened=intervened, regions=regions,
                pixel_area_mm2=self.pixel_area_mm2, transform=dscm.transform, schema=self.schema,
            )  # fmt: skip
            loss = sum((v for s in self.strategies for v in s(inputs).values()), torch.zeros((), device=x.device))
            return loss * x.shape[0]  # the terms average over the batch: per image, a sum

        parents = dscm.image_parents(dscm.transform.normalise(pa_cf))
        return image.predict_guided(exogenous, parents, guide, self.scale)
