"""The pretrain stage: fit the image mechanism by its likelihood objective (the paper's No-CFT model)."""

from __future__ import annotations

from typing import Any

from causalimg.pipeline.pretrain_check import check_pretrained
from causalimg.pipeline.stages.base import SEED, Step


def reads(mechanism: str = "image_mechanism") -> tuple[str, ...]:
    """``mechanism``: the config path of the image mechanism this stage pretrains."""
    return ("data", "regions", "flows", mechanism, "pretrain")


def run(step: Step) -> dict[str, Any]:
    source, transform = step.source, step.transform
    dscm = step.build.dscm(step.schema, source.image_shape, transform)

    def objective(model, batch, _step):
        out = model.loss(batch["image"], dscm.image_parents(transform.normalise(batch["parents"])))
        return {name: value.mean() for name, value in out.items()}  # "loss" and the mechanism's parts

    seed = step.config.run.seed + SEED["pretrain"]
    summary = step.train(dscm.image, objective, source.split("train"), step.config.pretrain, seed)
    if step.is_main:  # fit leaves the EMA weights in the model
        summary.update(check_pretrained(dscm, transform, source.split("train"), source.split("test"), step.dir))
    return summary
