"""The evaluate stage of one strategy: every configured metric on the test split, and Figure 1's images.

Metrics see the fine-tuned DSCM at the fine-tuning temperature through ``DSCMCounterfactuals``,
measure with the EVALUATION segmentor, and score against the data set's true counterfactuals
where it has them. The test images are sharded over processes and the rows gathered with
``accelerator.gather_for_metrics``, so every process ends with the same summaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from causalimg.config.sections import TrainConfig
from causalimg.core.schema import VariableSchema
from causalimg.errors import InterventionError
from causalimg.io import atomic_path, atomic_write_json
from causalimg.metrics.base import (
    DSCMCounterfactuals,
    EvalContext,
    EvalInfo,
    TrueCounterfactual,
    collect_rows,
    summarise,
)
from causalimg.pipeline.stage import StageContext
from causalimg.training.accelerator import make_accelerator

METRICS_FILE = "metrics.json"
FIGURE_FILE = "figure.safetensors"
ROWS_FILE = "rows.safetensors"  # every metric's per-image rows, "<metric>/<column>", and "index"
EVALUATION_OUTPUTS = (METRICS_FILE, FIGURE_FILE, ROWS_FILE)  # in the stage's hash: a version writing more redoes it
FIGURE_CHANGE_MM2 = 20.0  # Figure 1: do(S-region := S-region + 20 mm^2), clipped to the support


def true_counterfactual(source: Any, split: str) -> TrueCounterfactual | None:
    """The data set's ground truth as a metric callable, or None where it has none.

    A data set knows its true counterfactuals when it has ``true_counterfactual_batch(split,
    indices, interventions)`` (the phantom). A target that does not fit an image's true geometry
    (the data set raises ``InterventionError``) has no true counterfactual: that image's outputs
    are NaN, which the ground-truth metric counts as unreachable and leaves out of its means.
    """
    render = getattr(source, "true_counterfactual_batch", None)
    if render is None:
        return None

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


def figure_images(
    dscm: Any, batch: Mapping[str, torch.Tensor], schema: VariableSchema, temperature: float
) -> dict[str, torch.Tensor]:
    """Counterfactuals of one test image, +20 mm^2 of the first structure in each region in turn.

    The image is the one of the batch with the most room for the change in its tightest region, so
    the clipping to the support shrinks the change as little as possible (the same image for every
    strategy, since the choice depends on the data only).
    """
    transform = dscm.transform
    structure = schema.structures[0].name
    columns = [transform.index(schema.area_name(structure, r)) for r in schema.regions]
    pa = batch["parents"]
    room = (transform.high[columns].to(pa) - pa[:, columns]).clamp(max=FIGURE_CHANGE_MM2).min(1).values  # (B,)
    i = int(room.argmax())
    x, pa = batch["image"][i : i + 1], pa[i : i + 1]
    model = DSCMCounterfactuals(dscm, temperature)
    images, targets = [], []
    for column in columns:
        target = (pa[:, column] + FIGURE_CHANGE_MM2).clamp(float(transform.low[column]), float(transform.high[column]))
        x_cf, _ = model.counterfactual(x, pa, {transform.names[column]: target})
        images.append(x_cf[0])
        targets.append(target)
    return {
        "factual": x[0].cpu(),  # (1, H, W)
        "counterfactuals": torch.stack(images).cpu(),  # (K, 1, H, W)
        "targets": torch.cat(targets).cpu(),  # (K,) mm^2
        "factual_values": pa[0, columns].cpu(),  # (K,)
        "regions": batch["regions"][i].cpu(),  # (K, H, W)
    }


def figure_titles(figure: Mapping[str, torch.Tensor], schema: VariableSchema) -> list[str]:
    structure = schema.structures[0].name
    return [
        f"do({schema.display(schema.area_name(structure, r))}: {float(a):.1f} -> {float(b):.1f})"
        for r, a, b in zip(schema.regions, figure["factual_values"], figure["targets"])
    ]


def evaluate_strategy(
    dscm: Any,
    evaluation_segmentor: torch.nn.Module,
    source: Any,
    config: Any,
    registry: Any,
    ctx: StageContext,
    seed: int,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``rows.safetensors`` and ``figure.safetensors``; returns the headline numbers."""
    accelerator = make_accelerator(TrainConfig(), ctx.dir)
    device = accelerator.device
    dscm.to(device).eval()
    evaluation_segmentor.to(device)
    test = source.split("test")
    n = min(config.evaluate.num_images, len(test))
    loader = DataLoader(Subset(test, range(n)), batch_size=config.finetune.train.batch_size)
    loader = accelerator.prepare_data_loader(loader)
    info = EvalInfo(source.schema)  # the area variables are intervened on and measured
    metrics = {m.name: registry.get("metric", m.name).factory(m) for m in config.evaluate.metrics}
    truth = true_counterfactual(source, "test")
    pixel_area = float(source.spacing_mm) ** 2

    @torch.no_grad()
    def segment(images: torch.Tensor) -> torch.Tensor:
        return evaluation_segmentor(images).softmax(dim=1)  # (B, C, H, W)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return evaluation_segmentor.features(images)  # (B, D)

    def make_context(batch: Mapping[str, Any]) -> EvalContext:
        # posterior samples (t > 0) are seeded per batch: a rerun gives the same numbers
        torch.manual_seed(int(np.random.SeedSequence([seed, int(batch["index"][0])]).generate_state(1)[0]))
        return EvalContext(info, dscm.transform, batch["regions"], pixel_area, segment, features, truth, seed=seed)

    model = DSCMCounterfactuals(dscm, config.finetune.temperature)
    indices, rows = collect_rows(metrics, model, loader, make_context, gatherer=accelerator)
    summaries = summarise(metrics, rows, info)
    if accelerator.is_main_process:
        atomic_write_json(ctx.dir / METRICS_FILE, {"num_images": n, "metrics": summaries})
        flat = {
            f"{name}/{column}": value.contiguous()
            for name, columns in rows.items()
            for column, value in columns.items()
        }
        with atomic_path(ctx.dir / ROWS_FILE) as tmp:
            save_file({"index": indices.long().contiguous(), **flat}, str(tmp))
        first = next(iter(DataLoader(Subset(test, range(min(n, 32))), batch_size=32)))
        first = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in first.items()}
        with torch.no_grad():
            figure = figure_images(dscm, first, source.schema, config.finetune.temperature)
        with atomic_path(ctx.dir / FIGURE_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in figure.items()}, str(tmp))
    accelerator.wait_for_everyone()
    headline: dict[str, Any] = {"num_images": n}
    for name in ("effectiveness", "ground-truth"):
        summary = summaries.get(name, {})
        if "intervened" in summary:
            headline[name] = {"intervened": summary["intervened"], "off_target": summary["off_target"]}
    return headline
