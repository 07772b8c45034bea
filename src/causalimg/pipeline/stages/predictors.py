"""The predictor stages: two segmentors (guidance and evaluation) and the regressor, trained on
factual data and frozen afterwards.

The two segmentors train on disjoint halves of the training split with different seeds, so the
evaluation is not scored by the model the generator was fine-tuned to please.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from causalimg.core.data import split_size
from causalimg.pipeline.stages.base import SEED, Step
from causalimg.predictors.regressor import evaluate_mae, regressor_objective
from causalimg.predictors.unet import evaluate_dice, segmentor_objective

SEGMENTORS = ("guidance-segmentor", "evaluation-segmentor")
SEGMENTOR_READS = ("data", "regions", "predictors.segmentor")
REGRESSOR_READS = ("data", "regions", "predictors.regressor")


def segmentor_half(n: int, which: str, seed: int) -> list[int]:
    """Disjoint halves of the training split for the two segmentors (one seeded permutation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    half = n // 2
    return sorted(perm[:half] if which == "guidance-segmentor" else perm[half:])


def run_segmentor(step: Step) -> dict[str, Any]:
    which, source, seed = step.label, step.source, step.config.run.seed
    train_split = source.split("train")
    half = Subset(train_split, segmentor_half(split_size(train_split), which, seed))
    model = step.build.segmentor(step.schema)
    config = step.config.predictors.segmentor
    summary = step.train(
        model, lambda m, batch, _: segmentor_objective(m, batch), half, config.train, seed + SEED[which]
    )
    summary["train_images"] = len(half)
    summary["test_dice"] = evaluate_dice(model, DataLoader(source.split("test"), batch_size=64), step.schema.classes)
    return summary


def run_regressor(step: Step) -> dict[str, Any]:
    source, transform = step.source, step.transform
    config = step.config.predictors.regressor
    model = step.build.regressor(step.schema)

    def objective(m, batch, _step):
        return regressor_objective(m, batch, transform, config.loss)

    seed = step.config.run.seed + SEED["regressor"]
    summary = step.train(model, objective, source.split("train"), config.train, seed)
    summary["test_mae"] = evaluate_mae(model, DataLoader(source.split("test"), batch_size=64), transform)
    return summary
