"""The recorded normalisation of causal variables, which also defines their support.

Networks see variables mapped from the training data's observed [low, high] to [-1, 1]. The same
range is the support an intervention must stay inside and the range targets are drawn from, so one
saved object answers "how is this variable scaled" and "which values are observed".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from causalimg.errors import DataError, InterventionError


@dataclass(frozen=True)
class VariableTransform:
    """Per-variable affine map mm^2 <-> [-1, 1] fitted on training data."""

    names: tuple[str, ...]
    low: torch.Tensor  # (P,)
    high: torch.Tensor  # (P,)

    @classmethod
    def fit(cls, names: tuple[str, ...], values: torch.Tensor) -> VariableTransform:
        """values: (N, P) observed training values."""
        values = values.double()
        low, high = values.min(0).values, values.max(0).values
        high = torch.where(high > low, high, low + 1.0)  # a constant variable still maps finitely
        return cls(tuple(names), low.float(), high.float())

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        """(..., P) in data units -> (..., P) in [-1, 1] over the observed range."""
        low, high = self.low.to(values), self.high.to(values)
        return (values - low) / (high - low) * 2 - 1

    def denormalise(self, values: torch.Tensor) -> torch.Tensor:
        low, high = self.low.to(values), self.high.to(values)
        return (values + 1) / 2 * (high - low) + low

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InterventionError(f"unknown variable {name!r}; known: {', '.join(self.names)}") from None

    def check_support(self, name: str, value: float, tolerance: float = 1e-6) -> None:
        """Raise if ``value`` lies outside the observed range of ``name``."""
        i = self.index(name)
        low, high = float(self.low[i]), float(self.high[i])
        span = (high - low) * tolerance
        if not (low - span <= value <= high + span):
            raise InterventionError(
                f"do({name} := {value:g}) is outside the observed support [{low:g}, {high:g}] of {name}"
            )

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "low": self.low.tolist(), "high": self.high.tolist()}, indent=2)

    @classmethod
    def load(cls, path: Path) -> VariableTransform:
        try:  # JSON only: the file can hold names and numbers, never code
            data = json.loads(Path(path).read_text())
            return cls(tuple(data["names"]), torch.tensor(data["low"]), torch.tensor(data["high"]))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"variable transform {str(path)!r} is unreadable: {type(err).__name__}: {err}") from None
