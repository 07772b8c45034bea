"""The whole pipeline on the tiny config: every stage, then a rerun, then one changed strategy."""

from __future__ import annotations

import json

import pytest

from causalimg.config.loader import load_config
from causalimg.pipeline.stages import Pipeline, run_pipeline, segmentor_half
from causalimg.plugins.manager import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


# Tiny networks gain nothing from a second thread, and on a shared machine spinning threads cost
# 20x (measured: 5 s with one thread, 2-4 min with two, at load 8 on 2 cores).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, registry, *overrides):
    return load_config("tiny", [f"run.dir={tmp_path / 'run'}", *overrides], registry)


def statuses(results):
    return {name: r["status"] for name, r in results.items()}


def test_the_evaluation_segmentor_never_reaches_fine_tuning(tmp_path, registry):
    stages = {s.name: s for s in Pipeline(tiny(tmp_path, registry), registry, None).stages()}
    for name, stage in stages.items():
        if name.startswith("finetune/"):
            assert "predictors/evaluation-segmentor" not in stage.upstream
            assert "predictors/guidance-segmentor" in stage.upstream
        if name.startswith("evaluate/"):
            assert "predictors/evaluation-segmentor" in stage.upstream
    guidance, evaluation = segmentor_half(101, "guidance-segmentor", 0), segmentor_half(101, "evaluation-segmentor", 0)
    assert not set(guidance) & set(evaluation) and len(guidance) + len(evaluation) == 101


@pytest.mark.slow
def test_tiny_run_end_to_end_then_skip_then_redo_one_strategy(tmp_path, registry):
    config = tiny(tmp_path, registry)
    first = run_pipeline(config, registry)
    labels = list(config.finetune.strategies)
    assert set(statuses(first).values()) == {"ran"}
    assert list(first) == [
        "data", "flows", "predictors/guidance-segmentor", "predictors/evaluation-segmentor", "predictors/regressor",
        "pretrain", *(f"{stage}/{label}" for label in labels for stage in ("finetune", "evaluate")), "report",
    ]  # fmt: skip
    report = tmp_path / "run" / "report"
    for name in (
        "table1.md",
        "table1.csv",
        "table1_ground_truth.md",
        "summary.md",
        "paired.md",
        "figure1.png",
        "report.html",
    ):
        assert (report / name).is_file(), name
    results = json.loads((report / "results.json").read_text())
    pairs = {(d["later"], d["earlier"]) for d in results["paired"]}
    assert len(pairs) == len(labels) * (len(labels) - 1) // 2  # every pair, later minus earlier in config order
    for label in labels:
        metrics = results["strategies"][label]
        assert {"effectiveness", "ground-truth", "composition", "reversibility", "realism"} <= set(metrics)
        assert metrics["effectiveness"]["cells"]["cpa_mid"]["cpa_mid"]["n"] == config.evaluate.num_images

    again = run_pipeline(config, registry)
    assert set(statuses(again).values()) == {"skipped"}

    changed = tiny(tmp_path, registry, "finetune.strategies.regressor=[{name: regressor, weight: 2.0}]")
    redo = statuses(run_pipeline(changed, registry))
    assert {name for name, status in redo.items() if status == "ran"} == {
        "finetune/regressor",
        "evaluate/regressor",
        "report",
    }

    only = statuses(run_pipeline(changed, registry, only="evaluate"))  # a group: every strategy's evaluation
    assert {name for name, status in only.items() if status == "ran"} == {f"evaluate/{label}" for label in labels}
    assert "report" not in only
    start = statuses(run_pipeline(changed, registry, start="report"))  # the report was made stale by --only
    assert start["report"] == "ran" and start["evaluate/none"] == "skipped"
