"""The evaluate stage of one strategy: every configured metric on the evaluation split, and Figure 1's images.

Metrics see the fine-tuned DSCM at the fine-tuning temperature through ``DSCMCounterfactuals``,
measure with the EVALUATION segmentor, and score against the data set's true counterfactuals
where it has them. The images are sharded over processes and the rows gathered with
``accelerator.gather_for_metrics``, so every process ends with the same summaries. Settings are
chosen on the ``val`` split; the ``test`` split is evaluated once per config (``evaluate.split``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from causalimg.builder import WEIGHTS_FILE
from causalimg.config.sections import FigureConfig, TrainConfig
from causalimg.core.data import Split, TrueCounterfactuals, split_size
from causalimg.core.guidance import GuidancePredictors, SamplingGuidance
from causalimg.core.schema import VariableSchema
from causalimg.core.scm import DSCM
from causalimg.errors import ConfigError, InterventionError
from causalimg.io import atomic_write_json, load_module, save_tensors
from causalimg.metrics.base import (
    DSCMCounterfactuals,
    EvalContext,
    EvalInfo,
    GuidedCounterfactuals,
    TrueCounterfactual,
    collect_rows,
    summarise,
)
from causalimg.pipeline.stages.base import Step
from causalimg.training.accelerator import make_accelerator

METRICS_FILE = "metrics.json"
FIGURE_FILE = "figure.safetensors"
ROWS_FILE = "rows.safetensors"  # every metric's per-image rows, "<metric>/<column>", and "index"
OUTPUTS = (METRICS_FILE, FIGURE_FILE, ROWS_FILE)  # in the stage's hash: a version writing more redoes it
FIGURE_CANDIDATES = 32  # Figure 1 shows the one of the first images with the most room for the change


def reads(mechanism: str = "image_mechanism", sampling_time: str | None = None) -> tuple[str, ...]:
    """``sampling_time``: the label of a sampling-time strategy, whose terms and predictors this stage applies."""
    guided = () if sampling_time is None else (
        "predictors", f"finetune.strategies.{sampling_time}", f"finetune.sampling_time.{sampling_time}")  # fmt: skip
    return ("data", "regions", "flows", mechanism, "predictors.segmentor", "finetune.temperature",
            "evaluate", "report.figure", *guided)  # fmt: skip


def upstream(finetuned: str, sampling_time: bool = False) -> tuple[str, ...]:
    """``finetuned``: the finetune stage whose DSCM this one evaluates."""
    guidance = ("predictors/guidance-segmentor", "predictors/regressor") if sampling_time else ()
    return ("data", "predictors/evaluation-segmentor", *guidance, finetuned)


def true_counterfactual(source: Any, split: Split) -> TrueCounterfactual | None:
    """The data set's ground truth as a metric callable, or None where it has none.

    A data set knows its true counterfactuals when it has the ``TrueCounterfactuals`` capability
    (the phantom). A target that does not fit an image's true geometry
    (the data set raises ``InterventionError``) has no true counterfactual: that image's outputs
    are NaN, which the ground-truth metric counts as unreachable and leaves out of its means.
    """
    if not isinstance(source, TrueCounterfactuals):
        return None
    render = source.true_counterfactual_batch

    def truth(
        batch: Mapping[str, Any], do: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = batch["index"].tolist()
        wanted = [{name: float(values[i]) for name, values in do.items()} for i in range(len(indices))]
        try:
            out = render(split, indices, wanted)
            return out["image"], out["masks"], out["parents"]
        except InterventionError:
            pass
        image = torch.full(batch["image"].shape, torch.nan)  # (B, 1, H, W)
        masks = torch.full(batch["masks"].shape, torch.nan)  # (B, C, H, W)
        parents = torch.full(batch["parents"].shape, torch.nan)  # (B, P)
        for i, (index, intervention) in enumerate(zip(indices, wanted)):
            try:
                out = render(split, [index], [intervention])
            except InterventionError:
                continue
            image[i], masks[i], parents[i] = out["image"][0], out["masks"][0], out["parents"][0]
        return image, masks, parents

    return truth


def figure_structure(schema: VariableSchema, figure: FigureConfig) -> str:
    """The structure Figure 1 changes: the configured one, or the data's first."""
    if figure.structure is None:
        return schema.structures[0].name
    return schema.structure(figure.structure).name


def figure_images(
    dscm: DSCM,
    batch: Mapping[str, torch.Tensor],
    schema: VariableSchema,
    figure: FigureConfig,
    temperature: float,
    truth: TrueCounterfactual | None = None,
    guidance: SamplingGuidance | None = None,
) -> dict[str, torch.Tensor]:
    """Counterfactuals of one image: ``figure.change`` more of one structure in each region in turn,
    and, where the data set knows them (``truth``), the TRUE counterfactuals of the same asks.

    The image is the one of the batch with the most room for the change in its tightest region, so
    the clipping to the support shrinks the change as little as possible (the same image for every
    strategy, since the choice depends on the data only). ``guidance``: a sampling-time strategy's.
    """
    transform = dscm.transform
    structure = figure_structure(schema, figure)
    columns = [transform.index(schema.area_name(structure, r)) for r in schema.regions]
    pa = batch["parents"]
    room = (transform.high[columns].to(pa) - pa[:, columns]).clamp(max=figure.change).min(1).values  # (B,)
    i = int(room.argmax())
    x, pa = batch["image"][i : i + 1], pa[i : i + 1]
    model = DSCMCounterfactuals(dscm, temperature)
    if guidance is not None:
        model = GuidedCounterfactuals(dscm, guidance, temperature)
        model.regions = batch["regions"][i : i + 1]
    one = {key: value[i : i + 1] for key, value in batch.items() if isinstance(value, torch.Tensor)}
    images, targets, true_images = [], [], []
    for column in columns:
        target = (pa[:, column] + figure.change).clamp(float(transform.low[column]), float(transform.high[column]))
        do = {transform.names[column]: target}
        x_cf, _ = model.counterfactual(x, pa, do)
        images.append(x_cf[0])
        targets.append(target)
        if truth is not None:
            true_images.append(truth(one, {name: value.cpu() for name, value in do.items()})[0][0].to(x_cf))
    out = {
        "factual": x[0].cpu(),  # (1, H, W)
        "counterfactuals": torch.stack(images).cpu(),  # (K, 1, H, W)
        "targets": torch.cat(targets).cpu(),  # (K,)
        "factual_values": pa[0, columns].cpu(),  # (K,)
        "regions": batch["regions"][i].cpu(),  # (K, H, W)
    }
    if truth is not None:
        out["true_counterfactuals"] = torch.stack(true_images).cpu()  # (K, 1, H, W); NaN where unreachable
    return out


def figure_titles(figure: Mapping[str, torch.Tensor], schema: VariableSchema, config: FigureConfig) -> list[str]:
    structure = figure_structure(schema, config)
    return [
        f"do({schema.display(schema.area_name(structure, r))}: {float(a):.1f} -> {float(b):.1f})"
        for r, a, b in zip(schema.regions, figure["factual_values"], figure["targets"])
    ]


def run_sampling_time(step: Step) -> dict[str, Any]:
    """``run`` for a sampling-time strategy: its guidance terms steer every counterfactual's prediction."""
    predictors = GuidancePredictors(  # the evaluation segmentor is deliberately not among them
        segmentor=step.build.frozen_segmentor(step.schema, step.ctx.inputs["predictors/guidance-segmentor"]),
        regressor=step.build.frozen_regressor(step.schema, step.ctx.inputs["predictors/regressor"]),
    )
    scale = step.config.finetune.sampling_time[step.strategy].scale
    guidance = SamplingGuidance(step.build.guidance(step.strategy, predictors), step.schema,
                                float(step.source.spacing_mm) ** 2, scale)  # fmt: skip
    return run(step, guidance)


def run(step: Step, guidance: SamplingGuidance | None = None) -> dict[str, Any]:
    """Write ``metrics.json``, ``rows.safetensors`` and ``figure.safetensors``; returns the headline numbers."""
    config, source, schema = step.config, step.source, step.schema
    accelerator = make_accelerator(TrainConfig(), step.dir)
    device = accelerator.device
    dscm = step.build.dscm(schema, source.image_shape, step.transform)
    load_module(dscm, step.input_of("finetune") / WEIGHTS_FILE)
    dscm.to(device).eval()
    if guidance is not None:
        for strategy in guidance.strategies:
            strategy.to(device)
    evaluation_segmentor = step.build.frozen_segmentor(schema, step.ctx.inputs["predictors/evaluation-segmentor"])
    evaluation_segmentor.to(device)
    split_name: Split = config.evaluate.split
    seed = config.run.seed
    split = source.split(split_name)
    n = config.evaluate.num_images
    if n > split_size(split):
        raise ConfigError(f"evaluate.num_images={n} exceeds the {split_size(split)} images of the {split_name} split")
    loader = DataLoader(Subset(split, range(n)), batch_size=config.evaluate.batch_size)
    loader = accelerator.prepare_data_loader(loader)
    info = EvalInfo(schema)  # the area variables are intervened on and measured
    metrics = step.build.metrics()
    truth = true_counterfactual(source, split_name)
    pixel_area = float(source.spacing_mm) ** 2
    temperature = config.finetune.temperature

    @torch.no_grad()
    def segment(images: torch.Tensor) -> torch.Tensor:
        return evaluation_segmentor(images).softmax(dim=1)  # (B, C, H, W)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return evaluation_segmentor.features(images)  # (B, D)

    model = (
        DSCMCounterfactuals(dscm, temperature)
        if guidance is None
        else GuidedCounterfactuals(dscm, guidance, temperature)
    )

    def make_context(batch: Mapping[str, Any]) -> EvalContext:
        # posterior samples (t > 0) are seeded per batch: a rerun gives the same numbers
        torch.manual_seed(int(np.random.SeedSequence([seed, int(batch["index"][0])]).generate_state(1)[0]))
        if isinstance(model, GuidedCounterfactuals):
            model.regions = batch["regions"]
        return EvalContext(info, dscm.transform, batch["regions"], pixel_area, segment, features, truth, seed=seed)

    indices, rows = collect_rows(metrics, model, loader, make_context, gatherer=accelerator)
    summaries = summarise(metrics, rows, info)
    if accelerator.is_main_process:
        atomic_write_json(step.dir / METRICS_FILE, {"num_images": n, "split": split_name, "metrics": summaries})
        flat = {f"{name}/{column}": value for name, columns in rows.items() for column, value in columns.items()}
        save_tensors(step.dir / ROWS_FILE, {"index": indices.long(), **flat})
        first = next(iter(DataLoader(Subset(split, range(min(n, FIGURE_CANDIDATES))), batch_size=FIGURE_CANDIDATES)))
        first = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in first.items()}
        with torch.no_grad():
            figure = figure_images(dscm, first, schema, config.report.figure, temperature, truth, guidance)
        save_tensors(step.dir / FIGURE_FILE, figure)
    accelerator.wait_for_everyone()
    headline: dict[str, Any] = {"num_images": n, "split": split_name}
    for name, summary in summaries.items():
        if "intervened" in summary:
            headline[name] = {"intervened": summary["intervened"], "off_target": summary["off_target"]}
    return headline
