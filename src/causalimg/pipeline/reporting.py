"""The report stage: Table 1 (evaluation segmentor and ground truth), the summary, Figure 1, HTML.

Reads ``evaluate/<label>/metrics.json``, ``rows.safetensors`` and ``figure.safetensors`` of every
strategy and writes, in the report folder: table1.md/.csv, table1_ground_truth.md/.csv,
summary.md/.csv, paired.md/.csv, figure1.png, intervened_error.png, results.json and report.html
(self-contained).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from causalimg.core.schema import VariableSchema
from causalimg.io import atomic_write_json, atomic_write_text, read_json
from causalimg.pipeline.components import SCHEMA_FILE
from causalimg.pipeline.evaluation import FIGURE_FILE, METRICS_FILE, ROWS_FILE, figure_titles
from causalimg.pipeline.stage import DONE, ProcessGroup
from causalimg.report.figures import error_bars, figure1
from causalimg.report.html import write_report
from causalimg.report.paired import paired_differences, paired_table, paper_order_findings
from causalimg.report.tables import PAPER_ORDER, Cell, Table, intervention_table, ordering_count, summary_table


def findings(results: dict[str, dict[str, Any]], variables: Sequence[str]) -> list[str]:
    """Plain sentences a reader checks first: who is best, and whether the paper's ordering holds."""
    lines = []
    for metric, what in (("effectiveness", "evaluation segmentor"), ("ground-truth", "true counterfactual")):
        scored = {
            label: r[metric]
            for label, r in results.items()
            if isinstance(r.get(metric), dict) and "intervened" in r[metric]
        }
        if not scored:
            continue
        best = min(scored, key=lambda label: scored[label]["intervened"])
        leak = min(scored, key=lambda label: _nan_last(scored[label]["off_target"]))
        lines.append(
            f"By the {what}: lowest intervened-region error {scored[best]['intervened']:.2f} mm^2 ({best}); "
            f"lowest off-target error {scored[leak]['off_target']:.2f} mm^2 ({leak})."
        )
        count = ordering_count(scored, variables, PAPER_ORDER)
        if count is not None:
            lines.append(
                f"By the {what}: {' < '.join(PAPER_ORDER)} on the intervened region for {count} of {len(variables)} interventions."
            )
    return lines


def predictor_tables(run_dir: Path) -> list[Table]:
    """Test-split quality of the frozen predictors: Dice per class, regressor MAE per variable."""
    tables = []
    dice = {
        name: summary["test_dice"]
        for name in ("guidance-segmentor", "evaluation-segmentor")
        if isinstance(summary := (read_json(run_dir / "predictors" / name / DONE) or {}).get("summary"), dict)
        and "test_dice" in summary
    }
    if dice:
        classes = tuple(next(iter(dice.values())))
        table = Table("Segmentors on the test split (Dice)", ("segmentor",), classes)
        table.rows = [((name,), [Cell(float(d[c])) for c in classes]) for name, d in dice.items()]
        tables.append(table)
    regressor = (read_json(run_dir / "predictors" / "regressor" / DONE) or {}).get("summary", {})
    if isinstance(regressor, dict) and "test_mae_mm2" in regressor:
        mae = regressor["test_mae_mm2"]
        table = Table("Regressor on the test split (MAE, mm^2)", ("regressor",), tuple(mae))
        table.rows = [(("regressor",), [Cell(float(v)) for v in mae.values()])]
        tables.append(table)
    return tables


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def write_run_report(
    out: Path, run_dir: Path, labels: Sequence[str], config_text: str, stage_names: Sequence[str], group: ProcessGroup
) -> dict[str, Any]:
    """Write every report file (main process) and return the headline numbers per strategy."""
    results = {label: read_json(run_dir / "evaluate" / label / METRICS_FILE)["metrics"] for label in labels}
    schema = VariableSchema.from_json((run_dir / "data" / SCHEMA_FILE).read_text())
    regions = schema.regions
    variables = schema.area_names  # the intervened and measured area variables
    tables: list[tuple[str, Table]] = []
    for name, metric, title in (
        ("table1", "effectiveness", "Table 1: effectiveness by the evaluation segmentor (mm^2)"),
        (
            "table1_ground_truth",
            "ground-truth",
            "Table 1 (ground truth): evaluation-segmentor areas on x~ vs the TRUE counterfactual (mm^2)",
        ),
    ):
        scored = {
            label: r[metric] for label, r in results.items() if isinstance(r.get(metric), dict) and "cells" in r[metric]
        }
        if scored:
            tables.append((name, intervention_table(scored, schema, title)))
    tables.append(("summary", summary_table(results)))
    rows = {label: load_file(str(run_dir / "evaluate" / label / ROWS_FILE)) for label in labels}
    differences = paired_differences(rows, len(regions))
    if differences:
        tables.append(("paired", paired_table(differences)))
    headline = {
        label: {
            m: {k: r[m][k] for k in ("intervened", "off_target") if k in r.get(m, {})}
            for m in ("effectiveness", "ground-truth")
            if m in r
        }
        for label, r in results.items()
    }
    lines = findings(results, variables) + paper_order_findings(differences)
    if group.is_main_process:
        for name, table in tables:
            atomic_write_text(out / f"{name}.md", f"## {table.title}\n\n{table.markdown()}")
            atomic_write_text(out / f"{name}.csv", table.csv())
        figures = []
        shown = {label: run_dir / "evaluate" / label / FIGURE_FILE for label in labels}
        if all(path.is_file() for path in shown.values()):
            loaded = {label: load_file(str(path)) for label, path in shown.items()}
            first = next(iter(loaded.values()))
            titles = figure_titles(first, schema)
            cfs = {label: list(f["counterfactuals"]) for label, f in loaded.items()}
            figures.append((figure1(first["factual"], cfs, first["regions"], regions, titles, out / "figure1.png"),
                            "Figure 1: +20 mm^2 calcified plaque per region (clipped to the support); x~ and x~ - x"))  # fmt: skip
        if "effectiveness" in next(iter(results.values()), {}):
            bars = {label: r["effectiveness"]["intervened_by_variable"] for label, r in results.items()}
            figures.append((error_bars(bars, variables, out / "intervened_error.png", "Intervened-region error (evaluation segmentor)"),
                            "Intervened-region error per intervention and strategy (mm^2, lower is better)"))  # fmt: skip
        timings = {
            name: {"status": "done", **_timing(run_dir / name)}
            for name in stage_names
            if (run_dir / name / DONE).is_file()
        }
        atomic_write_json(
            out / "results.json", {"strategies": results, "paired": differences, "findings": lines, "timings": timings}
        )
        write_report(
            out / "report.html",
            title=f"causalimg run {run_dir.name}",
            intro=f"Counterfactual fine-tuning strategies compared: {', '.join(labels)}. Run folder: {run_dir}.",
            tables=[table for _, table in tables] + predictor_tables(run_dir),
            figures=figures,
            timings=timings,
            configs={"config.yaml (resolved)": config_text},
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
