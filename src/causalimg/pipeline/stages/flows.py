"""The flows stage: fit the attribute mechanisms (one normalising flow per variable) by maximum likelihood."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from causalimg.builder import split_parents
from causalimg.pipeline.stages.base import SEED, Step

READS = ("data", "regions", "flows", "flows_train")


class ParentsOnly(Dataset):
    """The parents of a split as items ``{"parents": (P,)}``: what the flows train on."""

    def __init__(self, parents: torch.Tensor):
        self.parents = parents

    def __len__(self) -> int:
        return self.parents.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"parents": self.parents[i]}


def run(step: Step) -> dict[str, Any]:
    source = step.source
    flows = step.build.attribute_model(step.schema, step.transform)
    parents = ParentsOnly(split_parents(source.split("train")))

    def objective(model, batch, _step):
        return {"loss": -flows.flow_log_prob(batch["parents"]).mean()}

    seed = step.config.run.seed + SEED["flows"]
    summary = step.train(flows.attributes, objective, parents, step.config.flows_train, seed)
    with torch.no_grad():
        flows.cpu()
        summary["test_log_prob"] = float(flows.flow_log_prob(split_parents(source.split("test"))).mean())
    return summary
