"""The variable schema: which structures a data set segments, which regions a partitioner makes,
and the causal variables derived from them.

A data source owns its schema. The variable transform, the DSCM's graph, guidance, the segmentor's
classes, the regressor's outputs, metrics, tables, figures and the report all read it from there,
so nothing in causalimg's core names an anatomical structure. Area variables are named
``<structure>_<region>`` (``cpa_mid``) and ordered structure-major; other variables (an ``age``
root, say) come first in the parents tensor.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from causalimg.core.regions import variable_areas
from causalimg.errors import ConfigError, InterventionError

AREA_UNIT = "mm^2"


@dataclass(frozen=True)
class Structure:
    """A segmented structure whose area in each region is a causal variable.

    name:  the variable prefix (``cpa``); label: its class index in masks and segmentor outputs;
    title: what it is (``calcified plaque area``); abbreviation: how tables name it (``CPA``).
    """

    name: str
    label: int
    title: str = ""
    abbreviation: str = ""

    @property
    def short(self) -> str:
        return self.abbreviation or self.name.upper()


@dataclass(frozen=True)
class Variable:
    """One scalar causal variable; an area variable names its structure and region."""

    name: str
    unit: str = AREA_UNIT
    title: str = ""
    structure: str | None = None
    region: str | None = None
    intervenable: bool = True

    @property
    def is_area(self) -> bool:
        return self.structure is not None


@dataclass(frozen=True)
class VariableSchema:
    """Classes, structures, regions and the variables they make, with the causal graph.

    classes:    class name per label index (the segmentor predicts ``len(classes)`` classes)
    structures: the classes whose regional areas are variables, in variable order
    regions:    region names, in the order of the partitioner's masks
    extra:      variables that are not areas (first in the parents tensor)
    parents:    variable -> its parents; variables not listed are roots
    """

    classes: tuple[str, ...]
    structures: tuple[Structure, ...]
    regions: tuple[str, ...]
    extra: tuple[Variable, ...] = ()
    parents: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "structures", tuple(self.structures))
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "extra", tuple(self.extra))
        object.__setattr__(self, "parents", {k: tuple(v) for k, v in dict(self.parents).items()})
        _check_unique("class names", self.classes)
        _check_unique("region names", self.regions)
        _check_unique("structure names", [s.name for s in self.structures])
        _check_unique("structure labels", [s.label for s in self.structures])
        if not self.structures:
            raise ConfigError("a variable schema needs at least one structure")
        if not self.regions:
            raise ConfigError("a variable schema needs at least one region")
        for s in self.structures:
            if not 0 <= s.label < len(self.classes):
                raise ConfigError(f"structure {s.name!r} has label {s.label}; the classes are {list(self.classes)}")
        _check_unique("variable names", self.names)
        for child, parents in self.parents.items():
            unknown = [p for p in (child, *parents) if p not in self.names]
            if unknown:
                raise ConfigError(f"the graph names {unknown}, which are not variables; variables: {list(self.names)}")

    # -- the variables -------------------------------------------------------------------------
    @cached_property
    def areas(self) -> tuple[Variable, ...]:
        """Structure x region area variables, structure-major."""
        return tuple(
            Variable(
                self.area_name(s.name, r),
                AREA_UNIT,
                f"{s.title or s.name} in {r}",
                structure=s.name,
                region=r,
            )
            for s in self.structures
            for r in self.regions
        )

    @cached_property
    def variables(self) -> tuple[Variable, ...]:
        """Every variable in parents-tensor order: the extra ones, then the areas."""
        return self.extra + self.areas

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    @cached_property
    def area_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.areas)

    @cached_property
    def area_columns(self) -> tuple[int, ...]:
        """Positions of the area variables in the parents tensor."""
        return tuple(range(len(self.extra), len(self.extra) + len(self.areas)))

    @property
    def graph(self) -> dict[str, tuple[str, ...]]:
        """Every variable -> its parents (roots map to ())."""
        return {name: tuple(self.parents.get(name, ())) for name in self.names}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> tuple[int, ...]:
        """Class index of every structure, in structure order."""
        return tuple(s.label for s in self.structures)

    @staticmethod
    def area_name(structure: str, region: str) -> str:
        return f"{structure}_{region}"

    def variable(self, name: str) -> Variable:
        return self.variables[self.index(name)]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InterventionError(f"unknown variable {name!r}; known: {', '.join(self.names)}") from None

    def structure(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise ConfigError(f"unknown structure {name!r}; structures: {', '.join(s.name for s in self.structures)}")

    def display(self, name: str) -> str:
        """How tables name a variable: ``cpa_mid`` -> ``CPA-mid``; other variables by their name."""
        v = self.variable(name)
        if v.structure is None:
            return v.name
        return f"{self.structure(v.structure).short}-{v.region}"

    # -- positions of area variables ------------------------------------------------------------
    def area_region(self, area: int) -> int:
        """Region index of the ``area``-th area variable."""
        return area % len(self.regions)

    def same_structure(self, area: int) -> range:
        """Positions (among the area variables) of every region of the ``area``-th variable's structure."""
        first = area - self.area_region(area)
        return range(first, first + len(self.regions))

    # -- measurement ----------------------------------------------------------------------------
    def measure(self, probs: torch.Tensor, regions: torch.Tensor, pixel_area_mm2: float) -> torch.Tensor:
        """Area variables from class probabilities: (B, C, H, W), (B or 1, K, H, W) -> (B, S * K) mm^2."""
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"probabilities have {probs.shape[1]} classes; the schema has {self.num_classes}")
        if regions.shape[1] != len(self.regions):
            raise ValueError(f"{regions.shape[1]} region masks; the schema has regions {list(self.regions)}")
        return variable_areas(probs, regions, pixel_area_mm2, self.labels)

    # -- files ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "structures": [vars(s) for s in self.structures],
            "regions": list(self.regions),
            "extra": [vars(v) for v in self.extra],
            "parents": {k: list(v) for k, v in self.parents.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariableSchema:
        return cls(
            classes=tuple(data["classes"]),
            structures=tuple(Structure(**s) for s in data["structures"]),
            regions=tuple(data["regions"]),
            extra=tuple(Variable(**v) for v in data.get("extra", ())),
            parents={k: tuple(v) for k, v in data.get("parents", {}).items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> VariableSchema:
        return cls.from_dict(json.loads(text))


def _check_unique(what: str, items: Sequence[Any]) -> None:
    repeated = sorted(str(item) for item, count in Counter(items).items() if count > 1)
    if repeated:
        raise ConfigError(f"{what} must be unique; repeated: {', '.join(repeated)}")
