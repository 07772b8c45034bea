"""The shared base of measurement guidance: measure x~ with a frozen predictor, compare with targets.

Every built-in strategy reads some measurements m(x) (normalised, (B, M)) with a frozen predictor
and derives the same measurements from parents, t(pa). The loss is

    L = weight * mean_b sum_m  d(m(x~)_bm, t(pa~)_bm),    d = |.| (l1) or (.)^2 (l2)

where d is ``loss`` for the measurements the intervention targets and ``untouched_loss``
(default: ``loss``) for the others.

With ``soft_labels`` the measurements not touched by the intervention take the predictor's own
reading of the factual image as their target, shifted by whatever the SCM changed downstream:
t_bm = m(x)_bm + t(pa~)_bm - t(pa)_bm, so a predictor's bias on the factual image is not
penalised where nothing was asked to change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from einops import reduce
from pydantic import NonNegativeFloat, PositiveFloat
from torch import nn

from causalimg.core.guidance import GuidanceInputs, GuidancePredictors, GuidanceStrategy
from causalimg.core.regions import variable_areas
from causalimg.errors import ConfigError
from causalimg.predictors.frozen import freeze
from causalimg.strict import StrictModel


class GuidanceConfig(StrictModel):
    """Options every guidance strategy shares; a strategy's config adds ``name: Literal[...]``."""

    weight: NonNegativeFloat = 1.0
    loss: Literal["l1", "l2"] = "l2"
    # d for the measurements the intervention does not target (None: ``loss``); l1 keeps a firm
    # pull on small drifts where l2's vanishes
    untouched_loss: Literal["l1", "l2"] | None = None
    soft_labels: bool = False


class SoftAreaGuidanceConfig(GuidanceConfig):
    """Options of the strategies that read soft areas off a frozen segmentor."""

    # > 1: gradients of the areas come from softmax(logits / T), values stay those of softmax(logits)
    gradient_temperature: PositiveFloat = 1.0


def class_probabilities(logits: torch.Tensor, gradient_temperature: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) segmentor logits -> class probabilities whose backward pass is tempered.

    A confident segmentor's softmax is flat almost everywhere (p(1 - p) ~ 0), so a pixel far from a
    class gets no gradient towards it: growing a structure where there is none is slow. With
    T > 1 the value is unchanged (the measured area is the plain soft area) and the gradient is
    that of the softer softmax(logits / T), a straight-through estimator.
    """
    probs = logits.softmax(dim=1)
    if gradient_temperature == 1.0:
        return probs
    soft = (logits / gradient_temperature).softmax(dim=1)
    return soft + (probs - soft).detach()


def measurement_errors(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, M) elementwise d: |.| (l1) or (.)^2 (l2)."""
    diff = pred - target
    return diff.abs() if kind == "l1" else diff.square()


def area_indices(inputs: GuidanceInputs) -> torch.Tensor:
    """Parent columns of the structure x region area variables, structure-major, (S*K,)."""
    if tuple(inputs.transform.names) != inputs.schema.names:
        raise ConfigError(
            f"the data's variables {list(inputs.schema.names)} are not those the variable transform was fitted on "
            f"{list(inputs.transform.names)} (does the partitioner match the data set's?)"
        )
    return torch.tensor(inputs.schema.area_columns, dtype=torch.long)


def normalise_with(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The affine map of ``VariableTransform.normalise`` for given per-measurement ranges, (..., M)."""
    low, high = low.to(values), high.to(values)
    return (values - low) / (high - low) * 2 - 1


class MeasurementGuidance(GuidanceStrategy, ABC):
    """Base of the built-ins: subclasses say what they measure and which predictor they need."""

    predictor_field: ClassVar[Literal["segmentor", "regressor"]]

    def __init__(self, config: GuidanceConfig, predictor: nn.Module):
        super().__init__()
        self.config = config
        self.predictor = freeze(predictor)

    @classmethod
    def from_config(cls, config: GuidanceConfig, *, predictors: GuidancePredictors) -> MeasurementGuidance:
        predictor = getattr(predictors, cls.predictor_field)
        if predictor is None:
            raise ConfigError(
                f"guidance strategy {config.name!r} needs the frozen {cls.predictor_field}, "  # type: ignore[attr-defined]
                f"but none was given (train the {cls.predictor_field} stage first)"
            )
        return cls(config, predictor)

    @property
    def term_name(self) -> str:
        return self.config.name  # type: ignore[attr-defined]

    @abstractmethod
    def measure(self, image: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        """(B, 1, H, W) image -> (B, M) normalised measurements read by the frozen predictor."""
        ...

    @abstractmethod
    def target(self, parents: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        """(B, P) parents in data units -> (B, M) the normalised measurements they imply."""
        ...

    @abstractmethod
    def touched(self, intervened: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        """(B, P) bool intervened variables -> (B, M) bool measurements the intervention targets."""
        ...

    def forward(self, inputs: GuidanceInputs) -> dict[str, torch.Tensor]:
        config = self.config
        pred = self.measure(inputs.cf_image, inputs)  # (B, M), differentiable in x~
        target = self.target(inputs.cf_parents, inputs)  # (B, M)
        touched = self.touched(inputs.intervened, inputs)  # (B, M) bool
        if config.soft_labels:
            with torch.no_grad():
                reading = self.measure(inputs.image, inputs)
                shift = target - self.target(inputs.parents, inputs)
            target = torch.where(touched, target, reading + shift)
        target = target.detach()
        errors = torch.where(
            touched,
            measurement_errors(pred, target, config.loss),
            measurement_errors(pred, target, config.untouched_loss or config.loss),
        )  # (B, M)
        # summed over measurements, averaged over the batch
        return {self.term_name: config.weight * reduce(errors, "b m -> b", "sum").mean()}


class SoftAreaGuidance(MeasurementGuidance):
    """Base of the segmentor strategies: soft areas of every structure inside given region masks."""

    predictor_field = "segmentor"
    config: SoftAreaGuidanceConfig

    def soft_areas(self, image: torch.Tensor, regions: torch.Tensor, inputs: GuidanceInputs) -> torch.Tensor:
        """(B, 1, H, W) image, (B or 1, K, H, W) masks -> (B, S * K) soft areas (Eq. 2), structure-major."""
        probs = class_probabilities(self.predictor(image), self.config.gradient_temperature)  # (B, C, H, W)
        return variable_areas(probs, regions, inputs.pixel_area_mm2, inputs.schema.labels)
