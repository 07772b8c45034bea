"""Paired differences between strategies: is one really better, or inside the noise?

Every strategy is evaluated on the same test images with the same seeded intervention targets, so
the per-image errors of two strategies pair up. The difference of two means, each with its own
95 % interval, hides that pairing; the mean of the per-image differences with ITS interval is the
test a reader wants: an interval that excludes 0 says which strategy is better on these images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations, pairwise
from typing import Any

import torch

from causalimg.core.schema import VariableSchema
from causalimg.metrics.base import mean_ci, per_image_errors
from causalimg.report.tables import Cell, Table

QUANTITIES = ("intervened", "off_target")


def aligned(index_a: torch.Tensor, index_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the images both runs evaluated, in the same order: (N_a,), (N_b,) -> (M,), (M,)."""
    common = sorted(set(index_a.tolist()) & set(index_b.tolist()))
    where_a = {int(i): p for p, i in enumerate(index_a.tolist())}
    where_b = {int(i): p for p, i in enumerate(index_b.tolist())}
    return torch.tensor([where_a[i] for i in common], dtype=torch.long), torch.tensor(
        [where_b[i] for i in common], dtype=torch.long
    )


def paired_differences(
    rows: Mapping[str, Mapping[str, torch.Tensor]],
    schema: VariableSchema,
    measured_by: Mapping[str, str],
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[dict]:
    """For every pair of strategies (later minus earlier, in the given order), per measurement source:
    the mean per-image difference of the intervened and off-target errors with its 95 % interval.

    rows: label -> the flat contents of its ``rows.safetensors`` (``index`` plus ``metric/column``);
    measured_by: rows key of per-image (N, V_do, V) errors -> how tables name what measured them;
    pairs: the (earlier, later) labels to compare, every pair in ``rows`` order when None.
    """
    out = []
    for earlier, later in combinations(rows, 2) if pairs is None else pairs:
        a, b = aligned(rows[later]["index"], rows[earlier]["index"])
        for key, source in measured_by.items():
            if key not in rows[later] or key not in rows[earlier]:
                continue
            errors_later = per_image_errors(rows[later][key][a], schema)
            errors_earlier = per_image_errors(rows[earlier][key][b], schema)
            entry: dict[str, Any] = {"later": later, "earlier": earlier, "measured_by": source}
            for quantity in QUANTITIES:
                entry[quantity] = mean_ci(errors_later[quantity] - errors_earlier[quantity])
            out.append(entry)
    return out


def excludes_zero(stat: Mapping[str, float]) -> bool:
    return not math.isnan(stat["ci95"]) and abs(stat["mean"]) > stat["ci95"]


def paired_table(differences: list[dict], schema: VariableSchema) -> Table:
    unit = schema.areas[0].unit
    table = Table(
        f"Paired differences between strategies ({unit}, same images and targets)",
        ("comparison", "measured by"),
        ("intervened diff", "intervened 95% CI", "off-target diff", "off-target 95% CI"),
        note="Mean over the evaluated images of (later strategy's error - earlier strategy's), each image averaged "
        f"over the {len(schema.areas)} interventions; negative: the later strategy errs less. Bold: the 95% "
        "interval excludes 0.",
    )
    for d in differences:
        cells = []
        for quantity in QUANTITIES:
            stat = d[quantity]
            cells += [Cell(stat["mean"], stat["ci95"], best=excludes_zero(stat)), Cell(stat["ci95"])]
        table.rows.append(((f"{d['later']} - {d['earlier']}", d["measured_by"]), cells))
    return table


def paired_findings(differences: list[dict], first: str, second: str, unit: str = "mm^2") -> list[str]:
    """Sentences on ``first`` minus ``second``, by each measurement source (none if never paired)."""
    lines = []
    for d in differences:
        if {d["later"], d["earlier"]} != {first, second}:
            continue
        sign = 1.0 if d["later"] == first else -1.0
        parts = []
        for quantity, what in zip(QUANTITIES, ("intervened", "off-target")):
            mean, ci = sign * d[quantity]["mean"], d[quantity]["ci95"]
            verdict = ("lower" if mean < 0 else "higher") if excludes_zero(d[quantity]) else "no clear difference"
            parts.append(f"{what} {mean:+.2f} ± {ci:.2f} {unit} ({verdict})")
        lines.append(f"{first} - {second}, paired over images, by the {d['measured_by']}: " + "; ".join(parts) + ".")
    return lines


def ordering_findings(differences: list[dict], ordering: Sequence[str], unit: str = "mm^2") -> list[str]:
    """The paired verdicts behind an expected ordering (``report.ordering``): each strategy against the next."""
    return [line for first, second in pairwise(ordering) for line in paired_findings(differences, first, second, unit)]
