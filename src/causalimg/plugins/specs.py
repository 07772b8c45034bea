"""Typed records that plugins return from registration hooks.

A record names a component, the pydantic model of its config section (whose ``name`` field is a
``Literal`` equal to the record's name, so configs select components by name), a factory that
builds the component from a validated config, and a one-line summary shown by
``causalimg plugins``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel


@dataclass(frozen=True)
class PluginSpec:
    """Base record: what every registered component declares."""

    kind: ClassVar[str] = "component"
    name: str
    config: type[BaseModel]
    factory: Callable[..., Any]
    summary: str
    provider: str = field(default="", compare=False)  # filled in by the registry

    def __post_init__(self) -> None:
        fields = self.config.model_fields
        if "name" not in fields:
            raise TypeError(f"{self.kind} {self.name!r}: config model {self.config.__name__} has no 'name' field")


@dataclass(frozen=True)
class ImageMechanismSpec(PluginSpec):
    """An image mechanism: ``factory(config, *, image_shape, num_parents) -> ImageMechanism``."""

    kind: ClassVar[str] = "image_mechanism"


@dataclass(frozen=True)
class AttributeMechanismSpec(PluginSpec):
    """A scalar attribute mechanism: ``factory(config, *, num_context) -> AttributeMechanism``."""

    kind: ClassVar[str] = "attribute_mechanism"


@dataclass(frozen=True)
class GuidanceSpec(PluginSpec):
    """A guidance strategy: ``factory(config, *, predictors) -> GuidanceStrategy``."""

    kind: ClassVar[str] = "guidance"


@dataclass(frozen=True)
class PartitionerSpec(PluginSpec):
    """A region partitioner: ``factory(config) -> Partitioner``."""

    kind: ClassVar[str] = "partitioner"


@dataclass(frozen=True)
class DatasetSpec(PluginSpec):
    """A data set: ``factory(config, *, partitioner, root) -> DataSource``."""

    kind: ClassVar[str] = "dataset"


@dataclass(frozen=True)
class MetricSpec(PluginSpec):
    """A counterfactual metric: ``factory(config) -> Metric``."""

    kind: ClassVar[str] = "metric"


SPEC_KINDS: tuple[type[PluginSpec], ...] = (
    ImageMechanismSpec,
    AttributeMechanismSpec,
    GuidanceSpec,
    PartitionerSpec,
    DatasetSpec,
    MetricSpec,
)
