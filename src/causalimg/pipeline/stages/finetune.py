"""The finetune stage of one strategy: counterfactual fine-tuning of the pretrained DSCM.

Writes ``weights.safetensors``: the fine-tuned DSCM (flows and image mechanism), what the evaluate
stage reads. No-CFT, a strategy without guidance terms, is the paper's baseline: the pretrained
DSCM as it is, written unchanged by ``keep_pretrained``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from causalimg.builder import WEIGHTS_FILE
from causalimg.core.guidance import GuidancePredictors
from causalimg.io import load_module, save_tensors
from causalimg.pipeline.stages.base import SEED, Step
from causalimg.training.finetune import measure_nelbo

PRETRAIN = "pretrain"
EPS_BATCHES = 8  # training batches the pretrained nelbo (the constraint's level) is measured on


def upstream(pretrained: str = PRETRAIN) -> tuple[str, ...]:
    """``pretrained``: the stage whose image mechanism this one fine-tunes."""
    return ("data", "flows", "predictors/guidance-segmentor", "predictors/regressor", pretrained)


def reads(label: str, mechanism: str = "image_mechanism", settings: str = "finetune") -> tuple[str, ...]:
    """``settings``: where the mechanism's ``train`` and ``constraint`` are (``finetune`` or its
    ``finetune.per_mechanism`` entry, see ``config.run.finetune_settings_path``)."""
    shared = ("finetune.temperature", "finetune.trainable", "finetune.interventions_per_step")
    return ("data", "regions", "flows", mechanism, "predictors", f"{settings}.train", *shared,
            f"{settings}.constraint", f"finetune.strategies.{label}")  # fmt: skip


def untrained_reads(mechanism: str = "image_mechanism") -> tuple[str, ...]:
    """What ``keep_pretrained`` reads: the pretrained DSCM, whatever the fine-tuning settings (changing
    them redoes neither No-CFT nor a sampling-time strategy)."""
    return ("data", "regions", "flows", mechanism)


def keep_pretrained(step: Step) -> dict[str, Any]:
    """The finetune stage of No-CFT, the paper's baseline, and of a sampling-time strategy (whose
    terms act in evaluate): the pretrained DSCM as it is."""
    dscm = step.build.dscm(step.schema, step.source.image_shape, step.transform)
    load_module(dscm.attributes, step.ctx.inputs["flows"] / WEIGHTS_FILE)
    load_module(dscm.image, step.input_of(PRETRAIN) / WEIGHTS_FILE)
    if step.is_main:
        save_tensors(step.dir / WEIGHTS_FILE, dscm.state_dict())
    step.ctx.group.wait_for_everyone()
    return {"finetuned": False}


def keep_for_sampling(step: Step) -> dict[str, Any]:
    return {**keep_pretrained(step), "guided_at": "sampling"}


def run(step: Step) -> dict[str, Any]:
    source, schema = step.source, step.schema
    dscm = step.build.dscm(schema, source.image_shape, step.transform)
    load_module(dscm.attributes, step.ctx.inputs["flows"] / WEIGHTS_FILE)
    load_module(dscm.image, step.input_of(PRETRAIN) / WEIGHTS_FILE)
    terms = step.config.finetune.strategies[step.strategy]  # not empty: No-CFT is ``keep_pretrained``
    predictors = GuidancePredictors(  # the evaluation segmentor is deliberately not loaded here
        segmentor=step.build.frozen_segmentor(schema, step.ctx.inputs["predictors/guidance-segmentor"]),
        regressor=step.build.frozen_regressor(schema, step.ctx.inputs["predictors/regressor"]),
    )
    strategies = step.build.guidance(step.strategy, predictors)
    train = step.build.finetune_settings.train
    train_split = source.split("train")
    eps = measure_nelbo(dscm, DataLoader(train_split, batch_size=train.batch_size), max_batches=EPS_BATCHES)
    cft = step.build.finetuning(dscm, strategies, schema, float(source.spacing_mm) ** 2, eps)
    cft.train()
    seed = step.config.run.seed + SEED["finetune"]
    summary = step.train(cft, lambda m, batch, _: m(batch), train_split, train, seed, parameters=cft.trainable,
                         weights_prefix="dscm.")  # fmt: skip
    return {**summary, "finetuned": True, "terms": [t.name for t in terms], "eps_nelbo": eps}
