"""Realism: a Fréchet distance between counterfactual and real test images (FID-like).

Features are the evaluation segmentor's bottleneck activations averaged over space (the
``features`` of ``EvalContext``), not Inception's: an ImageNet network knows nothing of sCPRs
and would need a download. Each set of features is summarised by its mean and covariance and
  FD = |mu_r - mu_c|^2 + tr(S_r + S_c - 2 (S_r S_c)^(1/2)).
Reported for the counterfactuals of every single-variable intervention pooled (``fd``), and as a
floor the distance between two halves of the real images (``fd_real_halves``): a distance near
that floor means the counterfactuals are as close to the real images as real images are to each
other at this sample size. Values are comparable only between runs with the same evaluation
segmentor and number of images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

import causalimg
from causalimg.metrics.base import Column, CounterfactualModel, EvalContext, EvalInfo, ReportEntry, Rows
from causalimg.plugins.specs import MetricSpec
from causalimg.strict import StrictModel


class RealismConfig(StrictModel):
    name: Literal["realism"] = "realism"


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), a symmetric PSD matrix
    eval_a, evec_a = torch.linalg.eigh(cov_a)
    root_a = evec_a @ torch.diag(eval_a.clamp_min(0).sqrt()) @ evec_a.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0)
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle.sqrt().sum()
    return float(value.clamp_min(0))


class Realism:
    name = "realism"

    @classmethod
    def from_config(cls, config: RealismConfig) -> Realism:
        return cls()

    @torch.no_grad()
    def __call__(self, model: CounterfactualModel, batch: Mapping[str, Any], context: EvalContext) -> Rows:
        sweep = context.sweep(model, batch)
        b, p = sweep.targets.shape
        cf = context.features(sweep.cf_images.flatten(0, 1))  # (B * P, D)
        return {"real": context.features(batch["image"]), "counterfactual": cf.reshape(b, p, -1)}

    def aggregate(self, rows: Rows, info: EvalInfo) -> dict[str, Any]:
        real, cf = rows["real"], rows["counterfactual"]  # (N, D), (N, P, D)
        half = real.shape[0] // 2
        return {
            "fd": frechet_distance(real, cf.flatten(0, 1)),
            "fd_real_halves": frechet_distance(real[:half], real[half:]) if half >= 2 else float("nan"),
            "by_variable": {n: frechet_distance(real, cf[:, i]) for i, n in enumerate(info.variables)},
            "n": int(real.shape[0]),
        }

    def report(self, summary: Mapping[str, Any], info: EvalInfo) -> ReportEntry:
        return ReportEntry(
            columns=(Column("realism FD", summary["fd"]),),
            note=f"realism FD: Fréchet distance of evaluation-segmentor features, counterfactuals vs real images "
            f"(between two halves of the real images: {summary['fd_real_halves']:.3g}).",
        )


@causalimg.hookimpl
def causalimg_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(
            name="realism",
            config=RealismConfig,
            factory=Realism.from_config,
            summary="Fréchet distance of evaluation-segmentor features: counterfactuals vs real test images",
        )
    ]
