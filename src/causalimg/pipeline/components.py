"""Build the run's components from its config, the registry and the outputs of earlier stages.

Stages only pass files to each other (weights as safetensors, the variable transform as JSON);
these functions turn those files back into modules, the same way in every stage and on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from causalimg.core.data import DataSource
from causalimg.core.schema import VariableSchema
from causalimg.core.scm import DSCM, SCM
from causalimg.core.transform import VariableTransform
from causalimg.errors import DataError
from causalimg.plugins.manager import Registry
from causalimg.predictors.frozen import load_frozen
from causalimg.predictors.regressor import RegressorConfig, build_regressor
from causalimg.predictors.unet import SegmentorConfig, UNet

TRANSFORM_FILE = "transform.json"
SCHEMA_FILE = "schema.json"  # the data's VariableSchema, written by the data stage
WEIGHTS_FILE = "weights.safetensors"  # what training.loop.fit writes into its folder


def partitioner(config: Any, registry: Registry) -> Any:
    return registry.get("partitioner", config.regions.name).factory(config.regions)


def data_source(config: Any, registry: Registry, root: Path) -> DataSource:
    """The configured data set, caching what it generates under ``root`` (the data stage's folder)."""
    spec = registry.get("dataset", config.data.name)
    return spec.factory(config.data, partitioner=partitioner(config, registry), root=Path(root))


def split_parents(dataset: Dataset, batch_size: int = 512) -> torch.Tensor:
    """All parents of a split, (N, P) in data units, read through the data set's own items."""
    parents = [batch["parents"] for batch in DataLoader(dataset, batch_size=batch_size)]
    if not parents:
        raise DataError("the training split is empty: no parents to fit the variable transform on")
    return torch.cat(parents)


def load_transform(data_dir: Path) -> VariableTransform:
    return VariableTransform.load(Path(data_dir) / TRANSFORM_FILE)


def attribute_mechanisms(config: Any, registry: Registry, source: DataSource) -> nn.ModuleDict:
    """One attribute mechanism per variable, conditioned on its parents in the data's graph."""
    spec = registry.get("attribute_mechanism", config.flows.name)
    graph = source.schema.graph
    return nn.ModuleDict({v: spec.factory(config.flows, num_context=len(graph[v])) for v in graph})


def image_mechanism(config: Any, registry: Registry, source: DataSource) -> nn.Module:
    spec = registry.get("image_mechanism", config.image_mechanism.name)
    return spec.factory(
        config.image_mechanism, image_shape=tuple(source.image_shape), num_parents=len(source.schema.names)
    )


def dscm(config: Any, registry: Registry, source: DataSource, transform: VariableTransform) -> DSCM:
    """An untrained DSCM over the data's graph; load weights with ``load_module``."""
    graph = source.schema.graph
    return DSCM(
        SCM(graph), attribute_mechanisms(config, registry, source), image_mechanism(config, registry, source), transform
    )


def segmentor(config: Any, schema: VariableSchema) -> UNet:
    return UNet(SegmentorConfig(widths=config.predictors.segmentor.widths), num_classes=schema.num_classes)


def regressor(config: Any, num_outputs: int) -> nn.Module:
    return build_regressor(RegressorConfig(arch=config.predictors.regressor.model), num_outputs)


def frozen_segmentor(config: Any, schema: VariableSchema, stage_dir: Path) -> UNet:
    return load_frozen(segmentor(config, schema), Path(stage_dir) / WEIGHTS_FILE)


def frozen_regressor(config: Any, stage_dir: Path, num_outputs: int) -> nn.Module:
    return load_frozen(regressor(config, num_outputs), Path(stage_dir) / WEIGHTS_FILE)
