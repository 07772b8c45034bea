"""The report stage: a Table 1 per tabled metric, the summary, paired differences, Figure 1, HTML.

Driven by the metrics, not by their names: each metric's ``report`` says what it adds (summary
columns and their note, a Table 1 when it has per-intervention cells, per-image errors for paired
differences). The ``report`` config section chooses which metrics make a Table 1, the ordering of
strategies to check (the paper's by default) and Figure 1. Writes into the report folder:
``<metric table>.md/.csv``, ``summary.md/.csv``, ``paired.md/.csv``, ``figure1.png``,
``intervened_error.png``, ``results.json`` and the self-contained ``report.html``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from causalimg.config.loader import dump_config
from causalimg.config.run import mechanism_paths, runs_on, strategy_labels
from causalimg.core.schema import VariableSchema
from causalimg.errors import DataError
from causalimg.io import atomic_write_json, atomic_write_text, load_tensors, read_json
from causalimg.metrics.base import EvalInfo, ReportEntry
from causalimg.pipeline.stage import DONE
from causalimg.pipeline.stages.base import Step
from causalimg.pipeline.stages.evaluate import FIGURE_FILE, METRICS_FILE, ROWS_FILE, figure_titles
from causalimg.pipeline.stages.predictors import SEGMENTORS
from causalimg.report.figures import error_bars, figure1
from causalimg.report.html import write_report
from causalimg.report.paired import ordering_findings, paired_differences, paired_table
from causalimg.report.tables import Cell, Table, intervention_table, ordering_count, summary_table

READS = ("*",)  # the report shows the whole resolved config
TRUE_ROW = "true counterfactual"  # Figure 1's top row where the data set knows its causal model


def table_name(metric: str) -> str:
    """File stem of a metric's Table 1: ``effectiveness`` -> ``table1``, others ``table1_<metric>``."""
    return "table1" if metric == "effectiveness" else f"table1_{metric.replace('-', '_')}"


def findings(
    results: Mapping[str, Mapping[str, Any]],
    entries: Mapping[str, Mapping[str, ReportEntry]],
    schema: VariableSchema,
    orderings: Sequence[Sequence[str]],
) -> list[str]:
    """Plain sentences a reader checks first: who is best, and whether the expected ordering holds."""
    lines = []
    unit, variables = schema.areas[0].unit, schema.area_names
    metrics = dict.fromkeys(m for by_metric in entries.values() for m, e in by_metric.items() if e.table_title)
    for metric in metrics:
        scored = {label: r[metric] for label, r in results.items() if "intervened" in r.get(metric, {})}
        if not scored:
            continue
        what = next(e[metric].measured_by for e in entries.values() if metric in e) or metric
        best = min(scored, key=lambda label: scored[label]["intervened"])
        leak = min(scored, key=lambda label: _nan_last(scored[label]["off_target"]))
        lines.append(
            f"By the {what}: lowest intervened-region error {scored[best]['intervened']:.2f} {unit} ({best}); "
            f"lowest off-target error {scored[leak]['off_target']:.2f} {unit} ({leak})."
        )
        for ordering in orderings:
            count = ordering_count(scored, variables, ordering) if len(ordering) > 1 else None
            if count is not None:
                lines.append(
                    f"By the {what}: {' < '.join(ordering)} on the intervened region for {count} of "
                    f"{len(variables)} interventions."
                )
    return lines


def orderings(config: Any) -> list[list[str]]:
    """``report.ordering`` within each image mechanism, as the run labels its models."""
    return [
        [strategy if mechanism is None else f"{mechanism}/{strategy}" for strategy in config.report.ordering]
        for mechanism in mechanism_paths(config)
    ]


def comparisons(config: Any) -> list[tuple[str, str]]:
    """The (earlier, later) pairs the paired table shows: every two strategies of one image mechanism,
    and each strategy across mechanisms (not one mechanism's strategy against another's)."""
    mechanisms, strategies = list(mechanism_paths(config)), list(config.finetune.strategies)
    label = lambda m, s: s if m is None else f"{m}/{s}"  # noqa: E731
    on = lambda m: [s for s in strategies if runs_on(config, m, s)]  # noqa: E731
    within = [(label(m, a), label(m, b)) for m in mechanisms for a, b in combinations(on(m), 2)]
    across = [(label(a, s), label(b, s)) for s in strategies for a, b in combinations(mechanisms, 2)
              if runs_on(config, a, s) and runs_on(config, b, s)]  # fmt: skip
    return within + across


def predictor_tables(run_dir: Path, unit: str) -> list[Table]:
    """Quality of the frozen predictors on the test split: Dice per class, regressor MAE per variable."""
    tables = []
    dice = {}
    for name in SEGMENTORS:
        summary = (read_json(run_dir / "predictors" / name / DONE) or {}).get("summary")
        if isinstance(summary, dict) and "test_dice" in summary:
            dice[name] = summary["test_dice"]
    if dice:
        classes = tuple(next(iter(dice.values())))
        table = Table("Segmentors on the test split (Dice)", ("segmentor",), classes)
        table.rows = [((name,), [Cell(float(d[c])) for c in classes]) for name, d in dice.items()]
        tables.append(table)
    regressor = (read_json(run_dir / "predictors" / "regressor" / DONE) or {}).get("summary", {})
    if isinstance(regressor, dict) and "test_mae" in regressor:
        mae = regressor["test_mae"]
        table = Table(f"Regressor on the test split (MAE, {unit})", ("regressor",), tuple(mae))
        table.rows = [(("regressor",), [Cell(float(v)) for v in mae.values()])]
        tables.append(table)
    return tables


def _evaluation(path: Path) -> dict[str, Any]:
    found = read_json(path)
    if not isinstance(found, dict) or "metrics" not in found:
        raise DataError(f"{path} is missing or unreadable; rerun its evaluate stage")
    return found


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def run(step: Step) -> dict[str, Any]:
    """Write every report file (main process) and return the headline numbers per strategy."""
    config, schema, out = step.config, step.schema, step.dir
    run_dir = out.parent
    labels = strategy_labels(config)
    evaluated = {label: _evaluation(run_dir / "evaluate" / label / METRICS_FILE) for label in labels}
    results = {label: e["metrics"] for label, e in evaluated.items()}
    info, metrics, report = EvalInfo(schema), step.build.metrics(), config.report
    order = [*(m for m in report.tables if m in metrics), *(m for m in metrics if m not in report.tables)]
    entries = {  # the metrics that make a Table 1 first: their columns lead the summary
        label: {name: metrics[name].report(r[name], info) for name in order if name in r}
        for label, r in results.items()
    }
    unit = schema.areas[0].unit
    tables: list[tuple[str, Table]] = []
    for metric in report.tables:
        scored = {label: r[metric] for label, r in results.items() if "cells" in r.get(metric, {})}
        title = next((e[metric].table_title for e in entries.values() if metric in e), None)
        if scored and title:
            tables.append((table_name(metric), intervention_table(scored, schema, title)))
    tables.append(("summary", summary_table({label: list(e.values()) for label, e in entries.items()})))
    measured_by = {
        f"{name}/{entry.paired_rows}": entry.measured_by
        for e in entries.values()
        for name, entry in e.items()
        if entry.paired_rows
    }
    rows = {label: load_tensors(run_dir / "evaluate" / label / ROWS_FILE) for label in labels}
    differences = paired_differences(rows, schema, measured_by, comparisons(config))  # type: ignore[arg-type]
    if differences:
        tables.append(("paired", paired_table(differences, schema)))
    headline = {
        label: {m: {k: r[m][k] for k in ("intervened", "off_target")} for m in r if "intervened" in r[m]}
        for label, r in results.items()
    }
    ordered = orderings(config)
    lines = findings(results, entries, schema, ordered)
    lines += [line for ordering in ordered for line in ordering_findings(differences, ordering, unit)]
    if step.is_main:
        for name, table in tables:
            atomic_write_text(out / f"{name}.md", f"## {table.title}\n\n{table.markdown()}")
            atomic_write_text(out / f"{name}.csv", table.csv())
        figures = []
        shown = {label: run_dir / "evaluate" / label / FIGURE_FILE for label in labels}
        if all(path.is_file() for path in shown.values()):
            loaded = {label: load_tensors(path) for label, path in shown.items()}
            first = next(iter(loaded.values()))
            titles = figure_titles(first, schema, report.figure)  # type: ignore[arg-type]
            cfs = {label: list(f["counterfactuals"]) for label, f in loaded.items()}  # type: ignore[arg-type]
            truth = first.get("true_counterfactuals")
            if isinstance(truth, torch.Tensor) and bool(torch.isfinite(truth).all()):
                cfs = {TRUE_ROW: list(truth), **cfs}  # the answer every strategy is scored against, on top
            path = figure1(first["factual"], cfs, first["regions"], schema.regions, titles, out / "figure1.png")  # type: ignore[arg-type]
            figures.append(
                (
                    path,
                    f"Figure 1: {report.figure.change:g} {unit} more per region, clipped to the support; x~ and x~ - x"
                    + (
                        f" (top: the data set's {TRUE_ROW}, the answer each strategy is scored against)"
                        if TRUE_ROW in cfs
                        else ""
                    ),
                )
            )
        for metric in report.tables:
            bars = {
                label: r[metric]["intervened_by_variable"]
                for label, r in results.items()
                if metric in r and "intervened_by_variable" in r[metric]
            }
            if bars:
                name = (
                    f"intervened_error_{metric.replace('-', '_')}.png"
                    if metric != "effectiveness"
                    else "intervened_error.png"
                )
                measured = next(e[metric].measured_by for e in entries.values() if metric in e)
                figures.append((error_bars(bars, schema, out / name, f"Intervened-region error ({measured})"),
                                f"Intervened-region error per intervention and strategy ({unit}, lower is better), by the {measured}"))  # fmt: skip
        finished = [name for name in step.stage_names if (run_dir / name / DONE).is_file()]
        timings = {name: {"status": "done", **_timing(run_dir / name)} for name in finished}
        atomic_write_json(
            out / "results.json", {"strategies": results, "paired": differences, "findings": lines, "timings": timings}
        )
        split = next(iter(evaluated.values())).get("split", "test")
        write_report(
            out / "report.html",
            title=f"causalimg run {run_dir.name}",
            intro=f"Counterfactual fine-tuning strategies compared: {', '.join(labels)}; evaluated on the {split} split. "
            f"Run folder: {run_dir}.",
            tables=[table for _, table in tables] + predictor_tables(run_dir, unit),
            figures=figures,
            timings=timings,
            configs={"config.yaml (resolved)": dump_config(config)},
            findings=lines,
        )
    return {"strategies": headline, "findings": lines, "report": str(out / "report.html")}


def _timing(stage_dir: Path) -> dict[str, Any]:
    done = read_json(stage_dir / DONE) or {}
    summary = done.get("summary", {})
    timing = {"seconds": float(done.get("seconds", 0.0))}
    if isinstance(summary, dict) and "images_per_s" in summary:
        timing["images_per_s"] = summary["images_per_s"]
    return timing
