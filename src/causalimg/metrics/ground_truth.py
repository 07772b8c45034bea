"""Ground truth, which only a data set that knows its causal model allows (the phantom).

For each single-variable intervention of the effectiveness sweep, the data set renders the TRUE
counterfactual of the same exogenous state. Reported:
  area_error   |evaluation-segmentor area on x~ - area of the TRUE counterfactual masks| (mm^2),
               per (intervention, variable), in the layout of Table 1;
  floor        the same error of the evaluation segmentor on the TRUE counterfactual image: the
               part of area_error a perfect generator would still show (``segmentor_floor``);
  image error  x~ against the true counterfactual image in 0-255 units: MAE and PSNR inside the
               intervened variable's region and outside it.
A data set without ground truth yields no rows and the summary says so. A target that cannot
exist in an image's true geometry (the data set returns NaN for it) is counted as ``unreachable``
and left out of the means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from einops import reduce

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
    to_255,
)
from causalimg.plugins.specs import MetricSpec
from causalimg.strict import StrictModel


class GroundTruthConfig(StrictModel):
    name: Literal["ground-truth"] = "ground-truth"


def masked_errors(x: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE and PSNR (0-255 units, peak 255) of x vs truth over mask's pixels: (B, 1, H, W) x3 -> (B,), (B,)."""
    diff = to_255(x) - to_255(truth)
    pixels = reduce(mask, "b c h w -> b", "sum").clamp_min(1)
    mae = reduce(diff.abs() * mask, "b c h w -> b", "sum") / pixels
    mse = reduce(diff.square() * mask, "b c h w -> b", "sum") / pixels
    psnr = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))  # capped at 148 dB for identical images
    return mae, psnr


class GroundTruth:
    name = "ground-truth"

    @classmethod
    def from_config(cls, config: GroundTruthConfig) -> GroundTruth:
        return cls()

    @torch.no_grad()
    def __call__(self, model: CounterfactualModel, batch: Mapping[str, Any], context: EvalContext) -> Rows:
        if context.true_counterfactual is None:
            return {}
        sweep = context.sweep(model, batch)
        b = sweep.targets.shape[0]
        regions = context.regions.expand(b, -1, -1, -1)  # (B, K, H, W)
        area_error, floor, mae_in, mae_out, psnr_in, psnr_out, unreachable = [], [], [], [], [], [], []
        for v, name in enumerate(context.info.variables):
            true_image, true_masks, _ = context.true_counterfactual(batch, {name: sweep.targets[:, v]})
            x_cf = sweep.cf_images[:, v]  # (B, 1, H, W)
            true_image, true_masks = true_image.to(x_cf), true_masks.to(x_cf)
            unreachable.append(~torch.isfinite(true_image).flatten(1).all(1))  # (B,)
            true_areas = context.info.schema.measure(true_masks, context.regions, context.pixel_area_mm2)  # (B, V)
            area_error.append((context.measure(x_cf) - true_areas).abs())
            floor.append((context.measure(true_image.nan_to_num()) - true_areas).abs())  # NaN rows stay NaN
            inside = regions[:, context.info.schema.area_region(v)].unsqueeze(1).to(x_cf)  # (B, 1, H, W)
            mae, psnr = masked_errors(x_cf, true_image, inside)
            mae_in.append(mae)
            psnr_in.append(psnr)
            mae, psnr = masked_errors(x_cf, true_image, 1 - inside)
            mae_out.append(mae)
            psnr_out.append(psnr)
        return {
            "area_error": torch.stack(area_error, dim=1),  # (B, P_do, P) mm^2
            "floor_error": torch.stack(floor, dim=1),  # (B, P_do, P) the segmentor on the TRUE image
            "mae_in": torch.stack(mae_in, dim=1),  # (B, P_do) 0-255
            "mae_out": torch.stack(mae_out, dim=1),
            "psnr_in": torch.stack(psnr_in, dim=1),  # (B, P_do) dB
            "psnr_out": torch.stack(psnr_out, dim=1),
            "unreachable": torch.stack(unreachable, dim=1).float(),  # (B, P_do) 1 where no truth exists
        }

    def aggregate(self, rows: Rows, info: EvalInfo) -> dict[str, Any]:
        if not rows:
            return {"available": False, "reason": "the data set has no true counterfactuals"}
        summary = error_summary(rows["area_error"], info)
        summary["available"] = True
        floor = error_summary(rows["floor_error"], info)
        summary["segmentor_floor"] = {k: floor[k] for k in ("intervened", "off_target", "off_target_all")}
        summary["unreachable"] = {name: int(rows["unreachable"][:, i].sum()) for i, name in enumerate(info.variables)}
        summary["image"] = {
            column: {name: mean_ci(rows[column][:, i]) for i, name in enumerate(info.variables)}
            for column in ("mae_in", "mae_out", "psnr_in", "psnr_out")
        }
        summary["image_mean"] = {
            column: float(rows[column][torch.isfinite(rows[column])].mean()) if rows[column].numel() else math.nan
            for column in ("mae_in", "mae_out", "psnr_in", "psnr_out")
        }
        return summary

    def report(self, summary: Mapping[str, Any], info: EvalInfo) -> ReportEntry:
        if not summary.get("available"):
            return ReportEntry(note="true cf: not available (the data set has no true counterfactuals).")
        unit, floor, image = info.schema.areas[0].unit, summary["segmentor_floor"], summary["image_mean"]
        return ReportEntry(
            columns=(
                Column("intervened (true cf)", summary["intervened"]),
                Column("off-target (true cf)", summary["off_target"]),
                Column("segmentor floor, intervened (true cf)", floor["intervened"]),
                Column("segmentor floor, off-target (true cf)", floor["off_target"]),
                Column("MAE in (0-255)", image["mae_in"]),
                Column("MAE out (0-255)", image["mae_out"]),
                Column("PSNR in (dB)", image["psnr_in"], higher_is_better=True),
                Column("PSNR out (dB)", image["psnr_out"], higher_is_better=True),
            ),
            note=f"true cf: the evaluation segmentor's area on x~ against the TRUE counterfactual's ({unit}); "
            "segmentor floor: the same segmentor's error on the true counterfactual image itself; MAE and PSNR: "
            "x~ against the true counterfactual image inside and outside the intervened region.",
            table_title=f"Table 1 (ground truth): evaluation-segmentor areas on x~ vs the TRUE counterfactual ({unit})",
            paired_rows="area_error",
            measured_by="true counterfactual",
        )


@causalimg.hookimpl
def causalimg_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="ground-truth",
            config=GroundTruthConfig,
            factory=GroundTruth.from_config,
            summary="Errors against the data set's TRUE counterfactual: regional areas, image MAE and PSNR",
        )
    ]
