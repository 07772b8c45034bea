"""Composition (Monteiro et al. 2023): the null intervention should change nothing.

x_1 = f(x, pa, do()), x_n = f(x_{n-1}, pa, do()); reported as the mean L1 distance |x_n - x| in
0-255 units for each n in ``cycles`` (1 and 10 by default); ideal 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from einops import reduce
from pydantic import Field, PositiveInt

import causalimg
from causalimg.config.base import StrictModel
from causalimg.metrics.base import CounterfactualModel, EvalContext, EvalInfo, Rows, mean_ci, to_255
from causalimg.plugins.specs import MetricSpec


class CompositionConfig(StrictModel):
    name: Literal["composition"] = "composition"
    cycles: tuple[PositiveInt, ...] = Field((1, 10), min_length=1)


def l1_255(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean |a - b| in 0-255 units: (B, 1, H, W) x2 -> (B,)."""
    return reduce((to_255(a) - to_255(b)).abs(), "b c h w -> b", "mean")


class Composition:
    name = "composition"

    def __init__(self, cycles: tuple[int, ...] = (1, 10)):
        self.cycles = tuple(sorted(set(cycles)))

    @classmethod
    def from_config(cls, config: CompositionConfig) -> Composition:
        return cls(config.cycles)

    @torch.no_grad()
    def __call__(self, model: CounterfactualModel, batch: Mapping[str, Any], context: EvalContext) -> Rows:
        x, pa = batch["image"], batch["parents"]
        current, rows = x, {}
        for n in range(1, self.cycles[-1] + 1):
            current, _ = model.counterfactual(current, pa, {})
            if n in self.cycles:
                rows[f"l1_{n}"] = l1_255(current, x)  # (B,)
        return rows

    def aggregate(self, rows: Rows, info: EvalInfo) -> dict[str, Any]:
        return {column: mean_ci(values) for column, values in rows.items()}


@causalimg.hookimpl
def causalimg_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="composition",
            config=CompositionConfig,
            factory=Composition.from_config,
            summary="L1 (0-255) after applying the null intervention 1 and 10 times",
        )
    ]
