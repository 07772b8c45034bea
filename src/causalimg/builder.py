"""The one place that turns a run config into components: data, DSCM, predictors, fine-tuning, metrics.

The pipeline's stages, the tests, the benchmarks and the Python API all build through ``Builder``,
so a component is wired the same way wherever it is used. Stages pass files to each other
(``schema.json`` and ``transform.json`` from the data stage, ``weights.safetensors`` from every
training stage); ``Builder`` and the ``load_*`` functions turn them back into objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from causalimg.config.run import RunConfig
from causalimg.core.data import DataSource
from causalimg.core.guidance import GuidancePredictors, GuidanceStrategy
from causalimg.core.regions import Partitioner
from causalimg.core.schema import VariableSchema
from causalimg.core.scm import DSCM, SCM, AttributeModel
from causalimg.core.transform import VariableTransform
from causalimg.errors import CausalImgError, ConfigError, DataError, PluginError
from causalimg.io import load_module
from causalimg.metrics.base import Metric
from causalimg.plugins.manager import Registry
from causalimg.predictors.frozen import load_frozen
from causalimg.predictors.regressor import build_regressor
from causalimg.predictors.unet import UNet
from causalimg.training.finetune import CounterfactualFineTuning

TRANSFORM_FILE = "transform.json"  # the data stage's VariableTransform
SCHEMA_FILE = "schema.json"  # the data stage's VariableSchema
WEIGHTS_FILE = "weights.safetensors"  # what every training stage leaves (EMA weights)


def load_schema(data_dir: Path) -> VariableSchema:
    path = Path(data_dir) / SCHEMA_FILE
    try:
        return VariableSchema.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"variable schema {str(path)!r} is unreadable: {type(err).__name__}: {err}") from None


def load_transform(data_dir: Path) -> VariableTransform:
    return VariableTransform.load(Path(data_dir) / TRANSFORM_FILE)


def split_parents(dataset: Dataset, batch_size: int = 512) -> torch.Tensor:
    """All parents of a split, (N, P) in data units, read through the data set's own items."""
    parents = [batch["parents"] for batch in DataLoader(dataset, batch_size=batch_size)]
    if not parents:
        raise DataError("the training split is empty: no parents to fit the variable transform on")
    return torch.cat(parents)


def _check_transform(schema: VariableSchema, transform: VariableTransform) -> None:
    if tuple(transform.names) != schema.names:
        raise ConfigError(f"the transform's variables {list(transform.names)} are not the data's {list(schema.names)}")


class Builder:
    """Components of one run config and registry.

    ``config`` may be a stage's view of the run config: then everything built here reads only
    the fields that stage declared, and an undeclared read fails loudly. ``mechanism`` is the
    config path of the image mechanism to build (``compare_mechanisms.<label>`` for a compared one).
    """

    def __init__(
        self, config: RunConfig, registry: Registry, mechanism: str = "image_mechanism", tuned_as: str | None = None
    ):
        self.config, self.registry, self.mechanism = config, registry, mechanism
        self.tuned_as = tuned_as  # the mechanism's `finetune.per_mechanism` entry, if it has one

    @property
    def finetune_settings(self) -> Any:
        """The ``train`` and ``constraint`` this mechanism is fine-tuned with."""
        finetune = self.config.finetune
        return finetune if self.tuned_as is None else finetune.per_mechanism[self.tuned_as]

    @property
    def mechanism_config(self) -> Any:
        section, *label = self.mechanism.split(".")  # "image_mechanism" or "compare_mechanisms.<label>"
        node = getattr(self.config, section)
        return node[label[0]] if label else node

    def _make(self, kind: str, config: Any, **kwargs: Any) -> Any:
        """A registered component from its config; a plugin whose factory fails is named, not a traceback."""
        spec = self.registry.get(kind, config.name)
        try:
            return spec.factory(config, **kwargs)
        except CausalImgError:
            raise
        except Exception as err:
            raise PluginError(
                f"{kind} {config.name!r} ({spec.provider or 'registered at run time'}) failed to build: "
                f"{type(err).__name__}: {str(err)[:300]}"
            ) from err

    # -- data ----------------------------------------------------------------------------------
    def partitioner(self) -> Partitioner:
        regions = self.config.regions
        return self._make("partitioner", regions)

    def data_source(self, root: Path) -> DataSource:
        """The configured data set, caching what it generates under ``root`` (the data stage's folder)."""
        return self._make("dataset", self.config.data, partitioner=self.partitioner(), root=Path(root))

    # -- the causal model ----------------------------------------------------------------------
    def image_mechanism(self, schema: VariableSchema, image_shape: tuple[int, int]) -> nn.Module:
        return self._make(
            "image_mechanism",
            self.mechanism_config,
            image_shape=tuple(image_shape),
            num_parents=len(schema.names),
        )

    def attribute_mechanisms(self, schema: VariableSchema) -> dict[str, nn.Module]:
        """One attribute mechanism per variable, conditioned on its parents in the data's graph."""
        config = self.config.flows
        return {v: self._make("attribute_mechanism", config, num_context=len(p)) for v, p in schema.graph.items()}

    def attribute_model(self, schema: VariableSchema, transform: VariableTransform) -> AttributeModel:
        """The untrained flows alone (what the flows stage fits)."""
        _check_transform(schema, transform)
        return AttributeModel(SCM(schema.graph), self.attribute_mechanisms(schema), transform)

    def dscm(self, schema: VariableSchema, image_shape: tuple[int, int], transform: VariableTransform) -> DSCM:
        """An untrained DSCM over the data's graph; load weights with ``causalimg.io.load_module``."""
        _check_transform(schema, transform)
        scm = SCM(schema.graph)
        return DSCM(scm, self.attribute_mechanisms(schema), self.image_mechanism(schema, image_shape), transform)

    def trained_dscm(
        self, schema: VariableSchema, image_shape: tuple[int, int], transform: VariableTransform, weights: Path
    ) -> DSCM:
        return load_module(self.dscm(schema, image_shape, transform), weights)  # type: ignore[return-value]

    # -- predictors ----------------------------------------------------------------------------
    def segmentor(self, schema: VariableSchema) -> UNet:
        return UNet(self.config.predictors.segmentor, num_classes=schema.num_classes)

    def regressor(self, schema: VariableSchema) -> nn.Module:
        return build_regressor(self.config.predictors.regressor, len(schema.names))

    def frozen_segmentor(self, schema: VariableSchema, stage_dir: Path) -> UNet:
        return load_frozen(self.segmentor(schema), Path(stage_dir) / WEIGHTS_FILE)

    def frozen_regressor(self, schema: VariableSchema, stage_dir: Path) -> nn.Module:
        return load_frozen(self.regressor(schema), Path(stage_dir) / WEIGHTS_FILE)

    # -- fine-tuning ---------------------------------------------------------------------------
    def guidance(self, label: str, predictors: GuidancePredictors) -> list[GuidanceStrategy]:
        """One strategy per guidance term of ``finetune.strategies[label]`` (none for No-CFT)."""
        terms = self.config.finetune.strategies[label]  # validated: each term at most once
        return [self._make("guidance", t, predictors=predictors) for t in terms]

    def finetuning(
        self,
        dscm: DSCM,
        strategies: list[GuidanceStrategy],
        schema: VariableSchema,
        pixel_area_mm2: float,
        eps: float,
    ) -> CounterfactualFineTuning:
        finetune = self.config.finetune
        constraint = self.finetune_settings.constraint
        return CounterfactualFineTuning(
            dscm,
            strategies,
            schema=schema,
            pixel_area_mm2=pixel_area_mm2,
            eps=eps,
            constraint=constraint.kind,
            lagrange_lr=constraint.lagrange_lr,
            damping=constraint.damping,
            nelbo_weight=constraint.weight,
            temperature=finetune.temperature,
            interventions_per_step=finetune.interventions_per_step,
            trainable=finetune.trainable,
        )

    # -- evaluation ----------------------------------------------------------------------------
    def metrics(self) -> Mapping[str, Metric]:
        return {m.name: self._make("metric", m) for m in self.config.evaluate.metrics}
