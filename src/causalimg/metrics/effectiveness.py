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
from causalimg.config.base import StrictModel
from causalimg.metrics.base import CounterfactualModel, EvalContext, EvalInfo, Rows, mean_ci, same_structure
from causalimg.plugins.specs import MetricSpec


class EffectivenessConfig(StrictModel):
    name: Literal["effectiveness"] = "effectiveness"


def error_masks(num_variables: int, num_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_do, P_measured) bool masks: the intervened variable itself, and its structure's regions."""
    eye = torch.eye(num_variables, dtype=torch.bool)
    same = torch.zeros_like(eye)
    for i in range(num_variables):
        same[i, list(same_structure(i, num_regions))] = True
    return eye, same


def per_image_errors(errors: torch.Tensor, num_regions: int) -> dict[str, torch.Tensor]:
    """Per-image headline errors from (N, P_do, P_measured): ``intervened`` and ``off_target``, (N,) each.

    Where no value is missing, the mean over images of the paired differences of two strategies is
    the difference of their ``error_summary`` headlines.
    """
    eye, same = error_masks(errors.shape[1], num_regions)
    return {
        "intervened": errors[:, eye].nanmean(1),
        "off_target": errors[:, same & ~eye].nanmean(1) if num_regions > 1 else torch.full(errors.shape[:1], torch.nan),
    }


def error_summary(errors: torch.Tensor, info: EvalInfo) -> dict[str, Any]:
    """Summaries of per-image errors (N, P_do, P_measured) in the layout of Table 1.

    ``cells[do][measured]`` holds mean, ci95 and n; ``intervened`` averages the diagonal,
    ``off_target`` the other regions of the intervened structure, ``off_target_all`` every
    non-intervened variable.
    """
    names, k = info.variables, len(info.region_names)
    cells = {do: {measured: mean_ci(errors[:, i, j]) for j, measured in enumerate(names)} for i, do in enumerate(names)}
    per_do = errors.nanmean(0)  # (P_do, P_measured); NaN rows: no ground truth for that image
    eye, same = error_masks(len(names), k)
    return {
        "cells": cells,
        "intervened": float(per_do[eye].nanmean()),
        "off_target": float(per_do[same & ~eye].nanmean()) if k > 1 else float("nan"),
        "off_target_all": float(per_do[~eye].nanmean()),
        "intervened_by_variable": {name: float(per_do[i, i]) for i, name in enumerate(names)},
        "off_target_by_variable": {
            name: float(per_do[i][same[i] & ~eye[i]].nanmean()) if k > 1 else float("nan")
            for i, name in enumerate(names)
        },
    }


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
