"""The paper's Table 1, shipped as data, and this run's intervened-region errors beside it.

Source: Positional Segmentor-Guided Counterfactual Fine-Tuning for Spatially Localized Image
Synthesis, arXiv 2603.21213v1 (2026), Table 1, CC BY 4.0: effectiveness errors per region on
private CCTA data. Absolute values are not comparable with the phantom's, so the comparison is of
ratios to No-CFT and of orderings.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from causalimg.core.schema import VariableSchema
from causalimg.report.tables import Cell, Table

PAPER_TABLE = "paper_table1.csv"
PAPER_METHODS = ("Pos-Seg-CFT", "Reg-CFT", "No-CFT")  # the paper's claimed ordering, best first


def paper_table() -> list[dict[str, str]]:
    """Rows ``intervention, cft_type, proximal, mid, distal`` of the paper's Table 1."""
    text = (importlib.resources.files("causalimg.report") / PAPER_TABLE).read_text()
    return list(csv.DictReader(io.StringIO(text)))


def paper_comparison(
    summaries: Mapping[str, Mapping[str, Any]], schema: VariableSchema, ordering: Sequence[str]
) -> Table:
    """Ratios to No-CFT of the intervened-region error, the paper's beside this run's.

    summaries: strategy label -> ``effectiveness`` (or ``ground-truth``) summary; ordering: this
    run's labels for the paper's Pos-Seg-CFT, Reg-CFT and No-CFT (``report.ordering``).
    Interventions the paper has no row for (other structures or regions) show n/a.
    """
    label_of = dict(zip(PAPER_METHODS, ordering))
    paper = {(row["intervention"], row["cft_type"]): row for row in paper_table()}
    table = Table(
        "Intervened-region error relative to No-CFT: the paper vs this run",
        ("intervention",),
        ("paper reg/none", "ours reg/none", "paper pos/none", "ours pos/none"),
        note="Ratios of the intervened-region error to No-CFT's (lower is better); the paper's values are from "
        "its Table 1 (arXiv 2603.21213) on private CCTA data, ours from this run.",
    )
    for do in schema.area_names:
        name = f"do({schema.display(do)})"
        region = schema.variable(do).region or ""
        theirs = {
            m: float(paper[(name, m)][region])
            for m in PAPER_METHODS
            if (name, m) in paper and region in paper[(name, m)]
        }
        ours = {
            m: summaries[label_of[m]]["cells"][do][do]["mean"] for m in PAPER_METHODS if label_of.get(m) in summaries
        }

        def ratio(values: dict[str, float], method: str) -> float:
            return values[method] / values["No-CFT"] if method in values and values.get("No-CFT") else math.nan

        cells = [Cell(ratio(v, m)) for m in ("Reg-CFT", "Pos-Seg-CFT") for v in (theirs, ours)]
        table.rows.append(((name,), cells))
    return table
