"""Reversibility (Monteiro et al. 2023): undoing an intervention should give back the image.

For each variable v of the effectiveness sweep: x* = f(x, pa, do(v := target)) with parents pa*,
then x** = f(x*, pa*, do(v := pa_v)); reported as the mean L1 |x** - x| in 0-255 units, per
variable and overall; ideal 0. A test image whose own value pa_v lies outside the training
support cannot be intervened back to (do() refuses it): counted as ``outside_support``, left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

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


class ReversibilityConfig(StrictModel):
    name: Literal["reversibility"] = "reversibility"


class Reversibility:
    name = "reversibility"

    @classmethod
    def from_config(cls, config: ReversibilityConfig) -> Reversibility:
        return cls()

    @torch.no_grad()
    def __call__(self, model: CounterfactualModel, batch: Mapping[str, Any], context: EvalContext) -> Rows:
        x, pa = batch["image"], batch["parents"]
        sweep = context.sweep(model, batch)
        low, high = context.transform.low.to(pa), context.transform.high.to(pa)
        errors = []
        for v, (name, c) in enumerate(zip(context.info.variables, context.info.parent_columns)):
            inside = (pa[:, c] >= low[c]) & (pa[:, c] <= high[c])  # (B,) the way back is a valid intervention
            back_to = pa[:, c].clamp(low[c], high[c])
            back, _ = model.counterfactual(sweep.cf_images[:, v], sweep.cf_parents[:, v], {name: back_to})
            errors.append(torch.where(inside, l1_255(back, x), torch.nan))
        return {"l1": torch.stack(errors, dim=1)}  # (B, P) 0-255; NaN where pa_v lies outside the support

    def aggregate(self, rows: Rows, info: EvalInfo) -> dict[str, Any]:
        l1 = rows["l1"]
        return {
            "l1": mean_ci(l1.nanmean(1)),
            "by_variable": {n: mean_ci(l1[:, i]) for i, n in enumerate(info.variables)},
            "outside_support": {n: int(l1[:, i].isnan().sum()) for i, n in enumerate(info.variables)},
        }

    def report(self, summary: Mapping[str, Any], info: EvalInfo) -> ReportEntry:
        return ReportEntry(
            columns=(Column("reversibility", summary["l1"]["mean"]),),
            note="reversibility: L1 (0-255) between x and x after an intervention and its reversal.",
        )


@causalimg.hookimpl
def causalimg_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="reversibility",
            config=ReversibilityConfig,
            factory=Reversibility.from_config,
            summary="L1 (0-255) after an intervention and its reversal, pa -> pa* -> pa",
        )
    ]
