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
from causalimg.metrics.base import ReportEntry

INTERVENED_MARK = "†"


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


def summary_table(entries: Mapping[str, Sequence[ReportEntry]]) -> Table:
    """One row per strategy, one column per number the metrics report; best per column in bold.

    entries: strategy label -> the ``ReportEntry`` of every metric it was evaluated with.
    """
    names: dict[str, bool] = {}  # column -> higher is better, in the order the metrics give them
    notes: dict[str, None] = {}
    for metric_entries in entries.values():
        for entry in metric_entries:
            names.update({c.name: c.higher_is_better for c in entry.columns})
            if entry.note:
                notes[entry.note] = None
    table = Table("Summary per strategy", ("strategy",), tuple(names), note=" ".join(notes))
    for label, metric_entries in entries.items():
        reported = {c.name: c.value for entry in metric_entries for c in entry.columns}
        table.rows.append(((label,), [Cell(_number(reported.get(name))) for name in names]))
    for j, higher in enumerate(names.values()):
        present = [cells[j].value for _, cells in table.rows if not math.isnan(cells[j].value)]
        if present:
            best = max(present) if higher else min(present)
            for _, cells in table.rows:
                cells[j].best = cells[j].value == best
    return table


def ordering_count(
    summaries: Mapping[str, Mapping[str, Any]], variables: Sequence[str], order: Sequence[str]
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


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
