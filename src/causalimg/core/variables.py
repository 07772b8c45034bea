"""Structures, regions and the scalar variables derived from them.

A variable is one structure's area in one region, named ``<short>_<region>`` (``cpa_mid``), in mm^2.
Label indices are fixed across the package: 0 background, 1 lumen, 2 calcified plaque,
3 non-calcified plaque.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKGROUND, LUMEN, CALCIFIED, NONCALCIFIED = 0, 1, 2, 3
NUM_CLASSES = 4
CLASS_NAMES: tuple[str, ...] = ("background", "lumen", "calcified", "noncalcified")


@dataclass(frozen=True)
class Structure:
    """A segmented structure whose area is a causal variable."""

    label: int  # index into the class axis of masks
    short: str  # variable prefix, e.g. "cpa"
    title: str  # human name, e.g. "calcified plaque area"


STRUCTURES: tuple[Structure, ...] = (
    Structure(CALCIFIED, "cpa", "calcified plaque area"),
    Structure(NONCALCIFIED, "ncpa", "non-calcified plaque area"),
    Structure(LUMEN, "la", "lumen area"),
)


def variable_name(structure: Structure, region: str) -> str:
    """``cpa`` + ``mid`` -> ``cpa_mid``."""
    return f"{structure.short}_{region}"


def variable_names(region_names: tuple[str, ...]) -> tuple[str, ...]:
    """All structure x region variables, structure-major: cpa_proximal, cpa_mid, ..., la_distal."""
    return tuple(variable_name(s, r) for s in STRUCTURES for r in region_names)


def display_name(variable: str) -> str:
    """``cpa_mid`` -> ``CPA-mid`` (the paper's spelling)."""
    short, _, region = variable.partition("_")
    return f"{short.upper()}-{region}" if region else short.upper()
