"""Interventions as people write them: absolute values, changes, and values drawn per image.

One grammar serves the Python API, ``causalimg counterfactual --do`` and ``causalimg augment
--interventions``, so a value means the same thing wherever it is written:

=============  ====================================================================
``35``         set the variable to 35 (its unit, mm^2 for areas); a number in Python
``=35``        the same, spelled so that a negative value is not read as a change
``+20``        the factual value plus 20 (``-5``: minus 5)
``U(10, 40)``  a value drawn uniformly in [10, 40] for every image
``U``          a value drawn uniformly over the variable's observed support
``+U(-5, 5)``  the factual value plus a change drawn uniformly in [-5, 5] per image
=============  ====================================================================

Draws come from a generator keyed by (seed, image key, intervention, variable), so an image gets
the same target whatever the batch, the process or the order it is computed in. A target outside
the variable's observed support is an ``InterventionError`` unless the policy clamps it to the
support or skips that image (``OutOfSupport``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from causalimg.core.transform import VariableTransform
from causalimg.errors import InterventionError

OutOfSupport = Literal["error", "clamp", "skip"]
DRAW_STREAM = 7  # the random-target stream, apart from the evaluate stage's streams

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_UNIFORM = re.compile(rf"^(?P<change>\+)?U(?:\(\s*(?P<a>{_NUMBER})\s*,\s*(?P<b>{_NUMBER})\s*\))?$")


@dataclass(frozen=True)
class Value:
    """One variable's part of an intervention.

    change:  the target is the factual value plus this (``+20``), not the value itself (``35``)
    fixed:   a number, or one per image (B,), for fixed targets
    uniform: bounds of a per-image uniform draw; ``(None, None)`` means the observed support
    text:    how it was written, for messages and provenance
    """

    change: bool
    text: str
    fixed: torch.Tensor | None = None
    uniform: tuple[float | None, float | None] | None = None

    def resolve(
        self,
        factual: torch.Tensor,
        support: tuple[float, float],
        draws: torch.Tensor,
    ) -> torch.Tensor:
        """Targets (B,) from the factual values (B,), the support and uniform draws (B,) in [0, 1)."""
        if self.fixed is not None:
            value = self.fixed.to(factual).expand_as(factual)
        else:
            assert self.uniform is not None
            low = support[0] if self.uniform[0] is None else self.uniform[0]
            high = support[1] if self.uniform[1] is None else self.uniform[1]
            value = low + draws.to(factual) * (high - low)
        return factual + value if self.change else value.clone()

    @property
    def random(self) -> bool:
        return self.uniform is not None


Intervention = dict[str, Value]


def parse_value(name: str, value: Any) -> Value:
    """A number (absolute), a tensor or sequence (absolute, one per image) or a string of the grammar."""
    if isinstance(value, Value):
        return value
    if isinstance(value, bool):
        raise InterventionError(f"do({name}): {value!r} is not a number")
    if isinstance(value, (int, float)):
        return Value(change=False, text=f"{value:g}", fixed=torch.tensor(float(value), dtype=torch.float64))
    if isinstance(value, str):
        return _parse_text(name, value)
    try:
        fixed = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InterventionError(
            f"do({name}): {value!r} is neither a number, a list of numbers nor a text such as '+20', '35' or 'U(10, 40)'"
        ) from None
    if fixed.numel() == 0:
        raise InterventionError(f"do({name}): an empty list of values")
    return Value(change=False, text="per-image values", fixed=fixed)


def _parse_text(name: str, text: str) -> Value:
    compact = text.strip()
    match = _UNIFORM.match(compact)
    if match:
        if match["a"] is None:
            return Value(change=bool(match["change"]), text=compact, uniform=(None, None))
        a, b = float(match["a"]), float(match["b"])
        if not (np.isfinite(a) and np.isfinite(b) and a <= b):
            raise InterventionError(f"do({name} := {text}): the bounds of U(a, b) must be finite with a <= b")
        return Value(change=bool(match["change"]), text=compact, uniform=(a, b))
    change = compact[:1] in "+-" and compact != ""
    number = compact[1:] if compact.startswith("=") else compact
    try:
        amount = float(number)
    except ValueError:
        raise InterventionError(
            f"do({name} := {text!r}): not a value; write 35 (set), +20 or -5 (change), U(10, 40) or U (drawn per "
            f"image), +U(-5, 5) (a change drawn per image)"
        ) from None
    if not np.isfinite(amount):
        raise InterventionError(f"do({name} := {text}): value is not finite")
    return Value(change=change, text=compact, fixed=torch.tensor(amount, dtype=torch.float64))


def parse_intervention(do: Mapping[str, Any], names: Sequence[str]) -> Intervention:
    """``{variable: value}`` with every name checked against the model's variables."""
    if not isinstance(do, Mapping) or not do:
        raise InterventionError("empty intervention: name at least one variable, e.g. do={'cpa_mid': '+20'}")
    unknown = [str(n) for n in do if n not in names]
    if unknown:
        raise InterventionError(f"unknown variable {unknown[0]!r} in do(...); known: {', '.join(names)}")
    return {str(name): parse_value(str(name), value) for name, value in do.items()}


def parse_assignments(texts: Sequence[str], names: Sequence[str]) -> Intervention:
    """``["cpa_mid=+20", "la_mid=U"]`` (or one text ``cpa_mid=+20,la_mid=U``) -> one intervention."""
    do: dict[str, str] = {}
    for text in texts:
        for part in _split_top_level(text):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not name or not value.strip():
                raise InterventionError(f"{part!r}: write VARIABLE=VALUE, e.g. cpa_mid=+20, cpa_mid=35 or cpa_mid=U")
            if name in do:
                raise InterventionError(f"{name!r} is given twice in one intervention ({do[name]} and {value.strip()})")
            do[name] = value.strip()
    return parse_intervention(do, names)


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside parentheses: ``a=U(1, 2),b=+3`` -> ``["a=U(1, 2)", "b=+3"]``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def describe(intervention: Intervention) -> str:
    """``do(cpa_mid := +20, la_mid := U)``: how an intervention is named in messages and files."""
    return "do(" + ", ".join(f"{name} := {value.text}" for name, value in intervention.items()) + ")"


def uniform_draws(seed: int, keys: Sequence[int], which: int, count: int) -> torch.Tensor:
    """(B, count) uniform [0, 1) draws, one generator per (seed, image key, intervention ``which``)."""
    rows = [np.random.default_rng([seed, DRAW_STREAM, int(k), which]).random(count) for k in keys]
    return torch.as_tensor(np.stack(rows) if rows else np.zeros((0, count)), dtype=torch.float64)


@dataclass(frozen=True)
class Targets:
    """Resolved targets of one intervention for a batch.

    values:    variable -> (B,) targets in data units, after the support policy
    requested: variable -> (B,) targets as asked, before clamping
    clamped:   variable -> (B,) bool, True where the policy clamped the target
    keep:      (B,) bool, False for images the ``skip`` policy leaves out
    """

    values: dict[str, torch.Tensor]
    requested: dict[str, torch.Tensor]
    clamped: dict[str, torch.Tensor]
    keep: torch.Tensor


def resolve(
    intervention: Intervention,
    factual: torch.Tensor,
    transform: VariableTransform,
    *,
    keys: Sequence[int] | None = None,
    seed: int = 0,
    which: int = 0,
    policy: OutOfSupport = "error",
    labels: Sequence[str] | None = None,
    hint: str = "clamp targets to the support with clamp=True (command line: --clamp) or ask for less",
) -> Targets:
    """Targets of ``intervention`` for factual parents (B, P) in data units, checked against the support.

    keys name the images for the per-image draws (default: their positions); ``labels`` name them in
    messages (default ``image i``) and ``hint`` says how to get past a target outside the support.
    """
    batch = factual.shape[0]
    keys = list(range(batch)) if keys is None else list(keys)
    draws = (
        uniform_draws(seed, keys, which, len(transform.names)) if any(v.random for v in intervention.values()) else None
    )
    values, requested, clamped = {}, {}, {}
    keep = torch.ones(batch, dtype=torch.bool)
    for name, value in intervention.items():
        i = transform.index(name)
        if value.fixed is not None and value.fixed.numel() not in (1, batch):
            raise InterventionError(f"do({name}): {value.fixed.numel()} values given for {batch} images")
        low, high = float(transform.low[i]), float(transform.high[i])
        column = factual[:, i].double().cpu()
        target = value.resolve(column, (low, high), draws[:, i] if draws is not None else torch.zeros(batch))
        if not torch.isfinite(target).all():
            raise InterventionError(f"do({name} := {value.text}): a target is not finite")
        span = (high - low) * 1e-6  # the tolerance of VariableTransform.check_support
        outside = (target < low - span) | (target > high + span)
        if outside.any() and policy == "error":
            first = int(outside.nonzero()[0])
            who = labels[first] if labels is not None else f"image {first}"
            raise InterventionError(
                f"do({name} := {value.text}) gives {float(target[first]):g} for {who} (factual "
                f"{float(column[first]):g}), outside the observed support [{low:g}, {high:g}] of {name}"
                f"{f' ({int(outside.sum())} of {batch} targets are outside)' if int(outside.sum()) > 1 else ''}; {hint}"
            )
        requested[name] = target.float()
        values[name] = target.clamp(low, high).float()
        clamped[name] = outside
        if policy == "skip":
            keep &= ~outside
    return Targets(values, requested, clamped, keep)
