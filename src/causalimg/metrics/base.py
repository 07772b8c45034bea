"""What every counterfactual metric shares: the metric interface, the per-batch context, seeded
intervention targets, confidence intervals and the gather-across-processes evaluation loop.

A metric is two functions:
  ``metric(model, batch, context) -> {column: tensor}`` per-image rows, every tensor's first axis
      the batch axis (so ``accelerator.gather_for_metrics`` can gather it and drop the padding
      duplicates of the last batch), and
  ``metric.aggregate(rows, info) -> dict`` a JSON-able summary of the gathered rows.

``model`` is anything with ``counterfactual(x, pa, do) -> (x~, pa~)`` in data units (mm^2), the
signature of ``core.scm.DSCM.counterfactual`` at a fixed temperature (``DSCMCounterfactuals``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from einops import reduce, repeat

from causalimg.core.guidance import SamplingGuidance
from causalimg.core.schema import VariableSchema
from causalimg.core.transform import VariableTransform

Do = Mapping[str, torch.Tensor]  # variable -> (B,) targets in data units
Rows = dict[str, torch.Tensor]

# Seed streams: each kind of random choice draws from its own stream, per image index.
TARGET_STREAM = 1


class CounterfactualModel(Protocol):
    def counterfactual(self, x: torch.Tensor, pa: torch.Tensor, do: Do) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, H, W), pa (B, P) -> (x~ (B, 1, H, W), pa~ (B, P)); an empty ``do`` is the null intervention."""
        ...


class DSCMCounterfactuals:
    """A DSCM at a fixed abduction temperature: abduction, action, prediction.

    The abduction of the last (x, pa) pair is kept, so the interventions of a sweep (one per area
    variable) on the same images share one abduction (and, at t > 0, one posterior sample).
    """

    def __init__(self, dscm: Any, temperature: float = 0.0):
        self.dscm = dscm
        self.temperature = temperature
        self._last: tuple[torch.Tensor, torch.Tensor, Any] | None = None

    def _abduct(self, x: torch.Tensor, pa: torch.Tensor) -> Any:
        if self._last is None or self._last[0] is not x or self._last[1] is not pa:
            self._last = (x, pa, self.dscm.abduct(x, pa, self.temperature))
        return self._last[2]

    @torch.no_grad()
    def counterfactual(self, x: torch.Tensor, pa: torch.Tensor, do: Do) -> tuple[torch.Tensor, torch.Tensor]:
        pa_cf = self.dscm.counterfactual_parents(pa, do) if do else pa
        return self.dscm.predict(self._abduct(x, pa), pa_cf), pa_cf


class GuidedCounterfactuals(DSCMCounterfactuals):
    """``DSCMCounterfactuals`` whose prediction a ``SamplingGuidance`` steers (sampling-time strategies).

    The guidance's regional terms need the batch's region masks: ``regions`` is set to them before
    the batch's metrics run (the evaluate stage does so as it makes each batch's context).
    """

    def __init__(self, dscm: Any, guidance: SamplingGuidance, temperature: float = 0.0):
        super().__init__(dscm, temperature)
        self.guidance = guidance
        self.regions: torch.Tensor | None = None  # (B or 1, K, H, W) of the current batch

    @torch.no_grad()
    def counterfactual(self, x: torch.Tensor, pa: torch.Tensor, do: Do) -> tuple[torch.Tensor, torch.Tensor]:
        if self.regions is None:
            raise RuntimeError("GuidedCounterfactuals.regions is not set: give it the batch's region masks first")
        pa_cf = self.dscm.counterfactual_parents(pa, do) if do else pa
        intervened = torch.zeros_like(pa, dtype=torch.bool)  # (B, P)
        for name in do:
            intervened[:, self.dscm.transform.names.index(name)] = True
        exogenous = self._abduct(x, pa)
        return self.guidance.predict(self.dscm, exogenous, x, pa, pa_cf, intervened, self.regions), pa_cf


class TrueCounterfactual(Protocol):
    def __call__(self, batch: Mapping[str, Any], do: Do) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The data's TRUE counterfactual: (image (B, 1, H, W), masks (B, C, H, W), parents (B, P))."""
        ...


@dataclass(frozen=True)
class EvalInfo:
    """What metrics need to name things: the data's schema.

    The area variables (``schema.area_names``) are the ones intervened on and measured; the parents
    tensor may hold other variables too (a phantom with an ``age`` root), so metrics read the area
    columns through ``parent_columns``.
    """

    schema: VariableSchema

    @property
    def variables(self) -> tuple[str, ...]:
        return self.schema.area_names

    @property
    def region_names(self) -> tuple[str, ...]:
        return self.schema.regions

    @property
    def parent_columns(self) -> list[int]:
        return list(self.schema.area_columns)


@dataclass
class EvalContext:
    """Everything a metric may use for one batch, and the counterfactuals metrics share.

    segment:  image (B, 1, H, W) -> class probabilities (B, C, H, W) from the EVALUATION segmentor
    features: image -> (B, D) evaluation-segmentor features (realism)
    true_counterfactual: the data set's ground truth, or None where the data has none
    """

    info: EvalInfo
    transform: VariableTransform
    regions: torch.Tensor  # (B or 1, K, H, W)
    pixel_area_mm2: float
    segment: Callable[[torch.Tensor], torch.Tensor]
    features: Callable[[torch.Tensor], torch.Tensor]
    true_counterfactual: TrueCounterfactual | None = None
    seed: int = 0
    _sweep: Sweep | None = field(default=None, repr=False)

    def measure(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation-segmentor areas of every area variable, (N, V) in mm^2.

        images: (B, 1, H, W), or (B * R, 1, H, W) holding R images per batch image (image-major,
        as ``Sweep.cf_images.flatten(0, 1)``), which per-image regions are repeated to match.
        """
        regions = self.regions
        if regions.shape[0] not in (1, images.shape[0]):
            regions = repeat(regions, "b k h w -> (b r) k h w", r=images.shape[0] // regions.shape[0])
        return self.info.schema.measure(self.segment(images), regions, self.pixel_area_mm2)

    def sweep(self, model: CounterfactualModel, batch: Mapping[str, Any]) -> Sweep:
        """do(v := target) for each variable v in turn, computed once per batch and shared."""
        if self._sweep is None:
            self._sweep = Sweep.compute(model, batch, self)
        return self._sweep


@dataclass
class Sweep:
    """One single-variable intervention per area variable v (V of them), for every image of a batch.

    targets:    (B, V) the target of do(v) in column v
    cf_images:  (B, V, 1, H, W) x~ under do(v), v on the second axis
    cf_parents: (B, V, P) pa~ under do(v), every parent
    cf_areas:   (B, V, V) pa~ under do(v), the area variables only
    """

    targets: torch.Tensor
    cf_images: torch.Tensor
    cf_parents: torch.Tensor
    cf_areas: torch.Tensor

    @classmethod
    @torch.no_grad()
    def compute(cls, model: CounterfactualModel, batch: Mapping[str, Any], context: EvalContext) -> Sweep:
        x, pa = batch["image"], batch["parents"]
        columns = context.info.parent_columns
        targets = intervention_targets(batch["index"], context.transform, context.seed, TARGET_STREAM).to(pa)
        targets = targets[:, columns]  # (B, V)
        images, parents = [], []
        for v, name in enumerate(context.info.variables):
            x_cf, pa_cf = model.counterfactual(x, pa, {name: targets[:, v]})
            images.append(x_cf)
            parents.append(pa_cf)
        cf_parents = torch.stack(parents, dim=1)  # (B, V, P)
        return cls(targets, torch.stack(images, dim=1), cf_parents, cf_parents[..., columns])


def intervention_targets(index: torch.Tensor, transform: VariableTransform, seed: int, stream: int) -> torch.Tensor:
    """Targets uniform over each variable's observed range: (B,) image indices -> (B, P) mm^2.

    Drawn from a generator keyed by (seed, stream, image index), so an image gets the same targets
    whatever the batch size, the number of processes or the order of evaluation.
    """
    draws = [np.random.default_rng([seed, stream, int(i)]).random(len(transform.names)) for i in index.tolist()]
    u = torch.as_tensor(np.stack(draws), dtype=torch.float32).reshape(len(index), len(transform.names))  # (B, P)
    return transform.low + u * (transform.high - transform.low)


def to_255(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] intensities -> [0, 255], the units of the composition/reversibility literature."""
    return (image + 1) * 127.5


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile: exact below 5 degrees of freedom, else the Cornish-Fisher
    expansion (error < 5e-4)."""
    z = 1.959963984540054
    if df < 1:
        return math.nan
    if df <= 4:
        return (12.706204736, 4.302652730, 3.182446305, 2.776445105)[df - 1]
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci(values: torch.Tensor) -> dict[str, float]:
    """Mean and half-width of its 95% t-interval over the first axis of a 1-D tensor."""
    values = values.double().flatten()
    values = values[torch.isfinite(values)]
    n = int(values.numel())
    if n == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0}
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "ci95": math.nan, "n": 1}
    return {"mean": mean, "ci95": t_quantile_975(n - 1) * float(values.std()) / math.sqrt(n), "n": n}


def error_masks(schema: VariableSchema) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_do, V_measured) bool masks over the area variables: the intervened variable itself, and its
    structure's regions."""
    v = len(schema.areas)
    eye = torch.eye(v, dtype=torch.bool)
    same = torch.zeros_like(eye)
    for i in range(v):
        same[i, list(schema.same_structure(i))] = True
    return eye, same


def per_image_errors(errors: torch.Tensor, schema: VariableSchema) -> dict[str, torch.Tensor]:
    """Per-image headline errors from (N, P_do, P_measured): ``intervened`` and ``off_target``, (N,) each.

    Where no value is missing, the mean over images of the paired differences of two strategies is
    the difference of their ``error_summary`` headlines.
    """
    eye, same = error_masks(schema)
    several = len(schema.regions) > 1
    return {
        "intervened": errors[:, eye].nanmean(1),
        "off_target": errors[:, same & ~eye].nanmean(1) if several else torch.full(errors.shape[:1], torch.nan),
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
    eye, same = error_masks(info.schema)
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


def l1_255(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean |a - b| in 0-255 units: (B, 1, H, W) x2 -> (B,)."""
    return reduce((to_255(a) - to_255(b)).abs(), "b c h w -> b", "mean")


@dataclass(frozen=True)
class Column:
    """One number of the report's summary table."""

    name: str
    value: float
    higher_is_better: bool = False


@dataclass(frozen=True)
class ReportEntry:
    """What a metric contributes to the report; the report knows no metric by name.

    columns:     its numbers in the summary table, and ``note``, the sentence that explains them
    table_title: set when its summary holds per-intervention ``cells`` (``error_summary``): a Table 1
    paired_rows: its rows column of per-image (N, V_do, V) errors, for paired differences between
                 strategies; ``measured_by`` names what measured them
    """

    columns: tuple[Column, ...] = ()
    note: str = ""
    table_title: str | None = None
    paired_rows: str | None = None
    measured_by: str = ""


class Metric(Protocol):
    name: str

    def __call__(self, model: CounterfactualModel, batch: Mapping[str, Any], context: EvalContext) -> Rows: ...

    def aggregate(self, rows: Rows, info: EvalInfo) -> dict[str, Any]: ...

    def report(self, summary: Mapping[str, Any], info: EvalInfo) -> ReportEntry: ...


class Gatherer(Protocol):
    def gather_for_metrics(self, value: Any) -> Any: ...


def collect_rows(
    metrics: Mapping[str, Metric],
    model: CounterfactualModel,
    batches: Iterable[Mapping[str, Any]],
    make_context: Callable[[Mapping[str, Any]], EvalContext],
    gatherer: Gatherer | None = None,
) -> tuple[torch.Tensor, dict[str, Rows]]:
    """Run every metric on every batch and gather its rows across processes.

    Returns the image indices (N,) and, per metric, its rows with N on the first axis in the same
    order, so rows of two runs on the same test images can be paired image by image.
    With Accelerate, ``batches`` is a prepared data loader and ``gatherer`` the accelerator.
    """
    gather = gatherer.gather_for_metrics if gatherer is not None else (lambda value: value)
    indices: list[torch.Tensor] = []
    collected: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in metrics}
    for batch in batches:
        context = make_context(batch)
        indices.append(gather(torch.as_tensor(batch["index"]).contiguous()).cpu())
        for name, metric in metrics.items():
            for column, value in metric(model, batch, context).items():
                collected[name].setdefault(column, []).append(gather(value.detach().float().contiguous()).cpu())
    rows = {
        name: {column: torch.cat(parts) for column, parts in columns.items()} for name, columns in collected.items()
    }
    return (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)), rows


def summarise(metrics: Mapping[str, Metric], rows: Mapping[str, Rows], info: EvalInfo) -> dict[str, dict[str, Any]]:
    """Every metric's JSON-able summary of its gathered rows."""
    return {name: metric.aggregate(dict(rows[name]), info) for name, metric in metrics.items()}
