"""Mechanism contracts: what the DSCM needs from an image mechanism and an attribute mechanism.

Required: ``ImageMechanism`` and ``AttributeMechanism``. Optional capabilities are protocols of
their own, checked by type where a stage can use them (``causalimg.testing`` checks them too):
``HasEncoder`` (a bottom-up encoder that decoder-only fine-tuning leaves frozen) and
``Reconstructs`` (a picture of what the model sees in an image, for the pretraining check),
``SharesEncoderPass`` (the factual loss and the abduction from one pass, for fine-tuning speed) and
``GuidedPrediction`` (a prediction steered by a loss, for sampling-time guidance strategies).

Image mechanism x := g(z, pa_x) with exogenous state (latents z, pixel noise u); attribute
mechanism v := f(u; pa_v), an invertible map so that abduction u = f^-1(v; pa_v) is exact.
All parent tensors here are NORMALISED (see ``VariableTransform``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class Exogenous:
    """Abducted exogenous state of a batch of images.

    latents: one tensor per latent layer, (B, C_l, H_l, W_l), from the posterior q(z | x, pa)
    noise:   (B, 1, H, W) pixel noise u = (x - loc) / scale, so that predicting with the factual
             parents gives back x exactly
    """

    latents: list[torch.Tensor]
    noise: torch.Tensor


@runtime_checkable
class ImageMechanism(Protocol):
    """The image's mechanism; an ``nn.Module`` in practice."""

    def loss(self, x: torch.Tensor, pa: torch.Tensor) -> dict[str, torch.Tensor]:
        """Factual loss on x (B, 1, H, W) in [-1, 1] and pa (B, P).

        Returns per-image tensors (B,): ``loss``, the training objective, which pretraining
        minimises and counterfactual fine-tuning keeps from degrading, and any parts worth logging
        (the HVAE's ``nelbo``, ``nll`` and ``kl``, nats per pixel).
        """
        ...

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, t: float = 0.0) -> Exogenous:
        """Infer the exogenous state of x under its factual parents (t scales posterior noise)."""
        ...

    def predict(self, exogenous: Exogenous, pa: torch.Tensor) -> torch.Tensor:
        """Image (B, 1, H, W) in [-1, 1] generated from abducted state under parents pa."""
        ...

    def sample(self, pa: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """Fresh images under parents pa from the prior at temperature t."""
        ...


@runtime_checkable
class HasEncoder(Protocol):
    """An image mechanism with a bottom-up ``encoder`` module (abduction), apart from its generative path."""

    encoder: nn.Module


@runtime_checkable
class Reconstructs(Protocol):
    """An image mechanism that can show what it makes of an image under its factual parents."""

    def reconstruct(self, x: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [-1, 1]: the decoded mean of x's abducted state, without its pixel noise."""
        ...


@runtime_checkable
class SharesEncoderPass(Protocol):
    """An image mechanism that gives the factual loss and the abducted state from one pass over x
    (what a fine-tuning step needs both of)."""

    def loss_and_abduct(
        self, x: torch.Tensor, pa: torch.Tensor, t: float = 0.0
    ) -> tuple[dict[str, torch.Tensor], Exogenous]:
        """``(loss(x, pa), abduct(x, pa, t))``, with the same values in eval mode."""
        ...


@runtime_checkable
class GuidedPrediction(Protocol):
    """An image mechanism whose prediction a differentiable loss can steer while it is computed."""

    def predict_guided(
        self, exogenous: Exogenous, pa: torch.Tensor, guide: Callable[[torch.Tensor], torch.Tensor], scale: float
    ) -> torch.Tensor:
        """``predict(exogenous, pa)`` with each step pushed down the gradient of ``guide``, a scalar
        loss on the (B, 1, H, W) image the step heads for, summed over images, times ``scale``."""
        ...


@runtime_checkable
class AttributeMechanism(Protocol):
    """Invertible conditional map for one scalar variable; an ``nn.Module`` in practice."""

    def forward_map(self, u: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """v = f(u; pa): (B, 1) noise -> (B, 1) normalised value."""
        ...

    def inverse_map(self, v: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """u = f^-1(v; pa): abduction."""
        ...

    def log_prob(self, v: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """log p(v | pa), (B,): the maximum-likelihood training objective."""
        ...
