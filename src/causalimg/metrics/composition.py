"""Composition (Monteiro et al. 2023): the null intervention should change nothing.

x_1 = f(x, pa, do()), x_n = f(x_{n-1}, pa, do()); reported as the mean L1 distance |x_n - x| in
0-255 units for each n in ``cycles`` (1 and 10 by default); ideal 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

import causalimg
from causalimg.metrics.base import (
    Column,
    CounterfactualModel,
    EvalContext,
    EvalInfo,
    ReportEntry,
    Rows,
    l1_255,
    mean_ci,
)
from causalimg.plugins.specs import MetricSpec
from causalimg.strict import StrictModel


class CompositionConfig(StrictModel):
    name: Literal["composition"] = "composition"
    cycles: tuple[PositiveInt, ...] = Field((1, 10), min_length=1)


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

    def report(self, summary: Mapping[str, Any], info: EvalInfo) -> ReportEntry:
        return ReportEntry(
            columns=tuple(Column(f"composition x{c}", summary[f"l1_{c}"]["mean"]) for c in self.cycles),
            note="composition xn: L1 (0-255) between x and the null intervention applied n times.",
        )


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
