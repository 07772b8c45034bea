"""Attribute mechanism plugin ``spline-flow``: a conditional neural spline flow per scalar variable.

v = f(u; pa) with u ~ N(0, 1). zuko's flow is written data -> noise: ``flow(c).transform`` maps a
value v to its noise u, so abduction is ``transform(v)`` and generation is ``transform.inv(u)``.
A root variable's flow has no context at all (zuko's unconditional flow), not a zero-width one.
"""

from __future__ import annotations

from typing import Literal

import torch
import zuko
from pydantic import PositiveInt
from torch import nn

import causalimg
from causalimg.errors import ConfigError
from causalimg.plugins.specs import AttributeMechanismSpec
from causalimg.strict import StrictModel


class SplineFlowConfig(StrictModel):
    """Size of each variable's neural spline flow."""

    name: Literal["spline-flow"] = "spline-flow"
    transforms: PositiveInt = 3  # stacked monotonic rational-quadratic spline transforms
    bins: PositiveInt = 8  # spline bins on zuko's [-5, 5] bound; normalised values lie in [-1, 1]
    hidden: tuple[PositiveInt, ...] = (64, 64)  # hyper-network widths (context -> spline params)


class SplineFlow(nn.Module):
    """Invertible v = f(u; pa) for one normalised scalar variable; u and v are (B, 1)."""

    def __init__(self, num_context: int, *, transforms: int = 3, bins: int = 8, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        if num_context < 0:
            raise ConfigError(f"spline-flow: num_context must be >= 0, got {num_context}")
        self.num_context = num_context
        self.flow = zuko.flows.NSF(
            features=1, context=num_context, transforms=transforms, bins=bins, hidden_features=tuple(hidden)
        )

    @classmethod
    def from_config(cls, config: SplineFlowConfig, *, num_context: int) -> SplineFlow:
        return cls(num_context, transforms=config.transforms, bins=config.bins, hidden=config.hidden)

    def _distribution(self, context: torch.Tensor | None):
        """zuko's conditional distribution; checks the context matches the parents the flow was built for."""
        if self.num_context == 0:
            if context is not None and context.shape[-1] != 0:
                raise ValueError(f"root variable's flow takes no context, got shape {tuple(context.shape)}")
            return self.flow()
        if context is None or context.shape[-1] != self.num_context:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"flow expects context (B, {self.num_context}), got {got}")
        return self.flow(context)

    def forward_map(self, u: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """v = f(u; pa), (B, 1) -> (B, 1)."""
        return self._distribution(context).transform.inv(u)

    def inverse_map(self, v: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """u = f^-1(v; pa): abduction, (B, 1) -> (B, 1)."""
        return self._distribution(context).transform(v)

    def log_prob(self, v: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """log p(v | pa), (B, 1) -> (B,)."""
        return self._distribution(context).log_prob(v)


@causalimg.hookimpl
def causalimg_attribute_mechanisms() -> list[AttributeMechanismSpec]:
    return [
        AttributeMechanismSpec(
            name="spline-flow",
            config=SplineFlowConfig,
            factory=SplineFlow.from_config,
            summary="Conditional neural spline flow (zuko NSF); roots are unconditional",
        )
    ]
