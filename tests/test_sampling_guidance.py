"""Sampling-time guidance: a strategy's terms steer the prediction of a mechanism with
``GuidedPrediction`` instead of fine-tuning it, in the pipeline, the API and an exported model."""

from __future__ import annotations

import json

import pytest
import torch

from causalimg import CounterfactualModel
from causalimg.api.bundle import export_model
from causalimg.config.loader import dump_config, load_config
from causalimg.config.run import strategy_labels
from causalimg.errors import ConfigError
from causalimg.io import load_tensors
from causalimg.pipeline.graph import pipeline_stages, run_pipeline
from causalimg.pipeline.stages.report import comparisons
from causalimg.plugins.manager import load_registry
from causalimg.preflight import preflight

pytestmark = pytest.mark.usefixtures("one_thread")
FLOW = "image_mechanism={name: flow-matching, widths: [8, 16], blocks: [1, 1], embed_dim: 16, steps: 2}"
STRATEGIES = "finetune.strategies={none: [], guided: [{name: positional-segmentor}, {name: regressor, weight: 0.5}]}"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def tiny(tmp_path, registry, *overrides):
    return load_config("tiny", [f"run.dir={tmp_path / 'run'}", *overrides], registry)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.sampling_time={unknown: {}}", "must be a strategy label with guidance terms"),
        ("finetune.sampling_time={none: {}}", "must be a strategy label with guidance terms"),
        ("finetune.sampling_time={guided: {scale: 0}}", "finetune.sampling_time.guided.scale"),
    ],
)
def test_bad_sampling_time_strategies_are_config_errors(tmp_path, registry, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, registry, FLOW, STRATEGIES, override)


def test_a_mechanism_that_cannot_be_guided_is_refused_before_any_stage(tmp_path, registry):
    config = tiny(tmp_path, registry, STRATEGIES, "finetune.sampling_time={guided: {}}")  # the HVAE
    with pytest.raises(ConfigError, match="predict_guided.*'hvae'"):
        preflight(config, registry)


def test_a_sampling_time_strategy_can_name_the_mechanisms_it_steers(tmp_path, registry):
    """Beside a mechanism that cannot be guided, the strategy lists the ones that can: the run has
    its stages and report rows there and nowhere else."""
    compared = FLOW.replace("image_mechanism=", "compare_mechanisms.fm=")
    config = tiny(tmp_path, registry, compared, STRATEGIES, "finetune.sampling_time={guided: {mechanisms: [fm]}}")
    assert preflight(config, registry) is not None
    assert strategy_labels(config) == ["hvae/none", "fm/none", "fm/guided"]
    names = [stage.name for stage in pipeline_stages(config, registry, None)]
    assert "evaluate/fm/guided" in names and not any(name.endswith("hvae/guided") for name in names)
    assert ("hvae/guided", "fm/guided") not in comparisons(config)
    with pytest.raises(ConfigError, match="'diffusion' is not an image mechanism of this run \\(hvae, fm\\)"):
        tiny(tmp_path, registry, compared, STRATEGIES, "finetune.sampling_time={guided: {mechanisms: [diffusion]}}")
    every = tiny(tmp_path, registry, compared, STRATEGIES, "finetune.sampling_time={guided: {}}")
    with pytest.raises(ConfigError, match="without 'hvae'"):
        preflight(every, registry)


@pytest.mark.slow
def test_sampling_time_strategy_through_pipeline_api_and_export(tmp_path, registry):
    config = tiny(tmp_path, registry, FLOW, STRATEGIES, "finetune.sampling_time={guided: {scale: 5.0}}")
    assert preflight(config, registry) is not None
    results = run_pipeline(config, registry)
    run = tmp_path / "run"
    (run / "config.yaml").write_text(dump_config(config))
    assert results["finetune/guided"]["summary"]["guided_at"] == "sampling"
    pretrained = load_tensors(run / "finetune" / "none" / "weights.safetensors")
    kept = load_tensors(run / "finetune" / "guided" / "weights.safetensors")
    assert all(torch.equal(pretrained[k], kept[k]) for k in pretrained)  # nothing was fine-tuned
    rows = {label: load_tensors(run / "evaluate" / label / "rows.safetensors") for label in ("none", "guided")}
    key = "effectiveness/abs_error"
    assert not torch.equal(rows["none"][key], rows["guided"][key])  # the guidance changed the counterfactuals
    assert set(json.loads((run / "report" / "results.json").read_text())["strategies"]) == {"none", "guided"}

    guided = CounterfactualModel.from_pretrained(run, "guided")
    plain = CounterfactualModel.from_pretrained(run, "none")
    assert guided.guidance is not None and plain.guidance is None
    images = load_tensors(run / "evaluate" / "none" / "figure.safetensors")["factual"][None]  # (1, 1, H, W)
    ask = {"do": {"cpa_mid": "+1"}, "clamp": True}
    steered = guided.counterfactual(images, **ask)
    assert not torch.equal(steered.images, plain.counterfactual(images, **ask).images)
    exported = export_model(run, "guided", tmp_path / "exported")
    assert (exported / "regressor.safetensors").is_file()  # a term of the strategy reads the regressor
    again = CounterfactualModel.from_pretrained(exported).counterfactual(images, **ask)
    assert torch.equal(again.images, steered.images)
