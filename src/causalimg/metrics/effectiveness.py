"""Effectiveness (the paper's Table 1): does x~ show the intervened value, and only that change?

For each variable v, do(v := target) with the target uniform over v's observed range; the
EVALUATION segmentor measures every variable on x~ and the error |measured - pa~| (mm^2) is
reported for the intervened region and for every other region (off-target leakage). The
evaluation segmentor's own error on the factual images is reported as its floor.
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
    error_summary,
    mean_ci,
)
from causalimg.plugins.specs import MetricSpec
from causalimg.strict import StrictModel


class EffectivenessConfig(StrictModel):
    name: Literal["effectiveness"] = "effectiveness"


class Effectiveness:
    """Per-image |evaluation-segmentor area on x~ - pa~| for every (intervention, variable)."""

    name = "effectiveness"

    @classmethod
    def from_config(cls, config: EffectivenessConfig) -> Effectiveness:
        return cls()

    @torch.no_grad()
    def __call__(self, model: CounterfactualModel, batch: Mapping[str, Any], context: EvalContext) -> Rows:
        sweep = context.sweep(model, batch)
        b, p = sweep.targets.shape
        measured = context.measure(sweep.cf_images.flatten(0, 1)).reshape(b, p, p)  # (B, V_do, V)
        factual = batch["parents"][:, context.info.parent_columns]  # (B, V)
        return {
            "abs_error": (measured - sweep.cf_areas).abs(),  # (B, V_do, V) mm^2
            "factual_abs_error": (context.measure(batch["image"]) - factual).abs(),  # (B, V)
        }

    def aggregate(self, rows: Rows, info: EvalInfo) -> dict[str, Any]:
        summary = error_summary(rows["abs_error"], info)
        summary["segmentor_floor"] = {
            name: mean_ci(rows["factual_abs_error"][:, i]) for i, name in enumerate(info.variables)
        }
        return summary

    def report(self, summary: Mapping[str, Any], info: EvalInfo) -> ReportEntry:
        unit = info.schema.areas[0].unit
        return ReportEntry(
            columns=(
                Column("intervened (eval seg)", summary["intervened"]),
                Column("off-target (eval seg)", summary["off_target"]),
            ),
            note=f"eval seg: the evaluation segmentor's area on x~ against the target ({unit}; mean over the "
            f"{len(info.variables)} interventions; off-target: the intervened structure in the other regions).",
            table_title=f"Table 1: effectiveness by the evaluation segmentor ({unit})",
            paired_rows="abs_error",
            measured_by="evaluation segmentor",
        )


@causalimg.hookimpl
def causalimg_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="effectiveness",
            config=EffectivenessConfig,
            factory=Effectiveness.from_config,
            summary="Evaluation-segmentor error (mm^2) per intervention x region, with off-target leakage",
        )
    ]
