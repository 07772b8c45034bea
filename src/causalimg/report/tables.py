"""Table 1 and the summary tables, as one cell grid rendered to markdown, CSV and HTML.

Table 1 layout (the paper's): one block of rows per intervention do(STRUCTURE-region), one row per
fine-tuning strategy in the block, one column per region holding the error (mm^2) of the
intervened STRUCTURE in that region. The intervened region's cell is marked (†), and within each
block the lowest error of every column is bold. The same layout serves the evaluation segmentor's
errors (``effectiveness``) and the errors against the true counterfactual (``ground-truth``).
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from causalimg.core.schema import VariableSchema

INTERVENED_MARK = "†"

# The paper's ordering claim: on the intervened region, positional segmentor < regressor < none.
PAPER_ORDER: tuple[str, ...] = ("positional-segmentor", "regressor", "none")


@dataclass
class Cell:
    value: float
    ci95: float = math.nan
    intervened: bool = False
    best: bool = False

    def text(self, digits: int = 2) -> str:
        if isinstance(self.value, float) and math.isnan(self.value):
            return "n/a"
        small = 0 < abs(self.value) < 10**-digits  # keep small values (a Fréchet distance) readable
        number = f"{self.value:.2g}" if small else f"{self.value:.{digits}f}"
        return f"{number}{INTERVENED_MARK if self.intervened else ''}"


@dataclass
class Table:
    """Row labels (one or more key columns) and a grid of numeric cells."""

    title: str
    keys: tuple[str, ...]  # names of the label columns, e.g. ("intervention", "strategy")
    columns: tuple[str, ...]  # names of the numeric columns
    rows: list[tuple[tuple[str, ...], list[Cell]]] = field(default_factory=list)
    note: str = ""

    def markdown(self, digits: int = 2) -> str:
        lines = [
            "| " + " | ".join(self.keys + self.columns) + " |",
            "|" + "---|" * len(self.keys) + "---:|" * len(self.columns),
        ]
        previous: tuple[str, ...] = ()
        for labels, cells in self.rows:
            shown = [label if i > 0 or labels[:1] != previous[:1] else "" for i, label in enumerate(labels)]
            texts = [f"**{c.text(digits)}**" if c.best else c.text(digits) for c in cells]
            lines.append("| " + " | ".join(shown + texts) + " |")
            previous = labels
        out = "\n".join(lines)
        return f"{out}\n\n{self.note}\n" if self.note else out + "\n"

    def csv(self) -> str:
        """One row per table row: labels, the values, their 95% CI half-widths, the intervened column."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*self.keys, *self.columns, *(f"{c}_ci95" for c in self.columns), "intervened"])
        for labels, cells in self.rows:
            marked = [name for name, c in zip(self.columns, cells) if c.intervened]
            writer.writerow(
                [*labels, *(f"{c.value:.6g}" for c in cells), *(f"{c.ci95:.6g}" for c in cells), ";".join(marked)]
            )
        return buffer.getvalue()

    def html(self, digits: int = 2) -> str:
        head = "".join(f"<th>{html.escape(k)}</th>" for k in self.keys + self.columns)
        body = []
        for labels, cells in self.rows:
            tds = [f"<td>{html.escape(label)}</td>" for label in labels]
            for cell in cells:
                classes = " ".join(c for c, on in (("intervened", cell.intervened), ("best", cell.best)) if on)
                title = "" if math.isnan(cell.ci95) else f' title="95% CI ± {cell.ci95:.{digits}f}"'
                text = html.escape(cell.text(digits))
                text = f"<b>{text}</b>" if cell.best else text
                tds.append(f'<td class="num {classes}"{title}>{text}</td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        return (
            f"<table><caption>{html.escape(self.title)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>{note}"
        )


def intervention_table(summaries: Mapping[str, Mapping[str, Any]], schema: VariableSchema, title: str) -> Table:
    """Table 1 from per-strategy ``effectiveness`` (or ``ground-truth``) summaries.

    summaries: strategy label -> summary with ``cells[do][measured] = {"mean", "ci95"}``; strategies
    keep the given order inside every block.
    """
    variables, k = schema.area_names, len(schema.regions)
    table = Table(
        title,
        ("intervention", "strategy"),
        schema.regions,
        note=f"Mean absolute error (mm^2) of the intervened structure per region; {INTERVENED_MARK} intervened "
        "region; bold: lowest in its column within the intervention.",
    )
    for v, do in enumerate(variables):
        structure = v - v % k
        block = []
        for label, summary in summaries.items():
            row = summary["cells"][do]
            cells = [
                Cell(
                    row[variables[structure + j]]["mean"],
                    row[variables[structure + j]]["ci95"],
                    intervened=(structure + j == v),
                )
                for j in range(k)
            ]
            block.append(((f"do({schema.display(do)})", label), cells))
        for j in range(k):
            values = [cells[j].value for _, cells in block if not math.isnan(cells[j].value)]
            if values:
                for _, cells in block:
                    cells[j].best = cells[j].value == min(values)
        table.rows.extend(block)
    return table


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per strategy: the headline numbers of every metric, lower is better except PSNR."""
    columns = {
        "intervened (eval seg)": ("effectiveness", "intervened"),
        "off-target (eval seg)": ("effectiveness", "off_target"),
        "intervened (true cf)": ("ground-truth", "intervened"),
        "off-target (true cf)": ("ground-truth", "off_target"),
        "segmentor floor, intervened (true cf)": ("ground-truth", "segmentor_floor", "intervened"),
        "segmentor floor, off-target (true cf)": ("ground-truth", "segmentor_floor", "off_target"),
        "MAE in (0-255)": ("ground-truth", "image_mean", "mae_in"),
        "MAE out (0-255)": ("ground-truth", "image_mean", "mae_out"),
        "PSNR in (dB)": ("ground-truth", "image_mean", "psnr_in"),
        "PSNR out (dB)": ("ground-truth", "image_mean", "psnr_out"),
        "composition x1": ("composition", "l1_1", "mean"),
        "composition x10": ("composition", "l1_10", "mean"),
        "reversibility": ("reversibility", "l1", "mean"),
        "realism FD": ("realism", "fd"),
    }
    present = {
        name: path for name, path in columns.items() if any(_lookup(r, path) is not None for r in results.values())
    }
    table = Table(
        "Summary per strategy",
        ("strategy",),
        tuple(present),
        note="Areas in mm^2 (means over the 9 interventions); image errors against the true counterfactual "
        "inside / outside the intervened region; composition and reversibility are L1 in 0-255 units; "
        "bold: best in column (highest for PSNR).",
    )
    for label, result in results.items():
        cells = [Cell(_number(_lookup(result, path))) for path in present.values()]
        table.rows.append(((label,), cells))
    for j, name in enumerate(present):
        values = [cells[j].value for _, cells in table.rows if not math.isnan(cells[j].value)]
        if values:
            best = max(values) if name.startswith("PSNR") else min(values)
            for _, cells in table.rows:
                cells[j].best = cells[j].value == best
    return table


def ordering_count(
    summaries: Mapping[str, Mapping[str, Any]], variables: Sequence[str], order: Sequence[str] = PAPER_ORDER
) -> int | None:
    """Interventions whose intervened-region error is strictly increasing along ``order``.

    None when a strategy of ``order`` was not run.
    """
    if any(label not in summaries for label in order):
        return None
    count = 0
    for do in variables:
        errors = [summaries[label]["cells"][do][do]["mean"] for label in order]
        count += all(a < b for a, b in itertools.pairwise(errors))
    return count


def _lookup(result: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


# The paper's strategy names -> our strategy labels.
PAPER_LABELS: dict[str, str] = {"No-CFT": "none", "Reg-CFT": "regressor", "Pos-Seg-CFT": "positional-segmentor"}


def paper_comparison(paper_csv: str, summaries: Mapping[str, Mapping[str, Any]], schema: VariableSchema) -> Table:
    """Our intervened-region errors beside the paper's, as ratios to No-CFT (absolute values differ:
    the paper's data is private CCTA).

    paper_csv: the text of a CSV with columns intervention (``do(NCPA-proximal)``), cft_type
    (``No-CFT``, ``Reg-CFT``, ``Pos-Seg-CFT``) and one column per region, like the paper's Table 1.
    summaries: our strategy label -> ``effectiveness`` (or ``ground-truth``) summary.
    """
    paper: dict[tuple[str, str], dict[str, str]] = {}
    for row in csv.DictReader(io.StringIO(paper_csv)):
        paper[(row["intervention"], PAPER_LABELS.get(row["cft_type"], row["cft_type"]))] = row
    columns = ("paper reg/none", "ours reg/none", "paper pos/none", "ours pos/none")
    table = Table(
        "Intervened-region error relative to No-CFT: the paper vs this run",
        ("intervention",),
        columns,
        note="Ratios of the intervened-region error to No-CFT's (lower is better); the paper's values are from "
        "its Table 1 on private CCTA data, ours from the evaluation segmentor on the phantom.",
    )
    for do in schema.area_names:
        name = f"do({schema.display(do)})"
        region = schema.variable(do).region
        ours = {
            label: summaries[label]["cells"][do][do]["mean"]
            for label in ("none", "regressor", "positional-segmentor")
            if label in summaries
        }
        theirs = {
            label: float(paper[(name, label)][region]) for label in PAPER_LABELS.values() if (name, label) in paper
        }

        def ratio(values: dict[str, float], label: str) -> float:
            return values[label] / values["none"] if label in values and values.get("none") else math.nan

        cells = [
            Cell(ratio(theirs, "regressor")),
            Cell(ratio(ours, "regressor")),
            Cell(ratio(theirs, "positional-segmentor")),
            Cell(ratio(ours, "positional-segmentor")),
        ]
        table.rows.append(((name,), cells))
    return table
