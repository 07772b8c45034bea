"""The whole pipeline on the tiny config: every stage, then a rerun, then one changed strategy."""

from __future__ import annotations

import json

import pytest
import torch

from causalimg.config.loader import dump_config, load_config
from causalimg.errors import DataError
from causalimg.io import load_tensors, save_tensors
from causalimg.pipeline.graph import pipeline_stages, run_pipeline
from causalimg.pipeline.stage import SingleProcess, stage_hashes
from causalimg.pipeline.stages.predictors import segmentor_half
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
    stages = {s.name: s for s in pipeline_stages(tiny(tmp_path, registry), registry, SingleProcess())}
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
    # Figure 1 shows the phantom's TRUE counterfactual of each ask, changed inside the asked region only
    figure = load_tensors(tmp_path / "run" / "evaluate" / labels[0] / "figure.safetensors")
    truth, regions = figure["true_counterfactuals"], figure["regions"]  # (K, 1, H, W), (K, H, W)
    assert truth.shape == figure["counterfactuals"].shape and torch.isfinite(truth).all()
    change = (truth - figure["factual"]).abs().squeeze(1)  # (K, H, W)
    for k in range(len(regions)):
        assert change[k][regions[k] > 0.5].sum() > 0  # the asked region changed
        assert change[k][regions[k] < 0.5].max() < 1e-6  # nothing else did

    again = run_pipeline(config, registry)
    assert set(statuses(again).values()) == {"skipped"}

    weights = tmp_path / "run" / "pretrain" / "weights.safetensors"
    original = weights.read_bytes()
    save_tensors(weights, {k: torch.zeros_like(v) for k, v in load_tensors(weights).items() if torch.is_tensor(v)})
    with pytest.raises(DataError, match="pretrain/weights.safetensors changed"):  # swapped after the run
        run_pipeline(config, registry)
    weights.write_bytes(original)

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


def hashes(config, registry):
    return stage_hashes(pipeline_stages(config, registry, SingleProcess()))


def test_operational_training_fields_redo_no_stage(tmp_path, registry):
    base = hashes(tiny(tmp_path, registry), registry)
    for section in ("flows_train", "pretrain", "predictors.segmentor.train", "finetune.train"):
        for field, value in (
            ("log_every", 7),
            ("checkpoint_every", 3),
            ("keep_checkpoints", 5),
            ("tune_malloc", False),
        ):
            changed = hashes(tiny(tmp_path, registry, f"{section}.{field}={value}"), registry)
            assert changed == base, f"{section}.{field}"
    moved = hashes(tiny(tmp_path, registry, "tracking.tensorboard=true"), registry)
    assert moved == base


@pytest.mark.parametrize(("mechanism", "result_field"), [("hvae", "beta: 2.0"), ("flow-matching", "grid_power: 3.0")])
def test_recomputing_activations_redoes_no_stage(tmp_path, registry, mechanism, result_field) -> None:
    """Activation checkpointing trades memory for time with the same numbers: not part of any stage's hash."""
    runs = {
        on: hashes(tiny(tmp_path, registry, f"image_mechanism={{name: {mechanism}, checkpointing: {on}}}"), registry)
        for on in ("true", "false")
    }
    assert runs["true"] == runs["false"]
    other = hashes(tiny(tmp_path, registry, f"image_mechanism={{name: {mechanism}, {result_field}}}"), registry)
    assert other["pretrain"] != runs["true"]["pretrain"]  # a field that changes the model still counts


def test_no_cft_is_the_pretrained_model_whatever_the_fine_tuning_settings(tmp_path, registry):
    """Changing how strategies are fine-tuned redoes them, never No-CFT (its stage copies the
    pretrained DSCM) nor its evaluation."""
    config = tiny(tmp_path, registry)
    base = hashes(config, registry)
    guided = [label for label, terms in config.finetune.strategies.items() if terms]
    assert guided and len(guided) < len(config.finetune.strategies)
    for override in ("finetune.train.lr=0.003", "finetune.constraint.damping=1.0", "finetune.interventions_per_step=2"):
        changed = hashes(tiny(tmp_path, registry, override), registry)
        assert {name for name in base if changed[name] != base[name]} == {
            f"{stage}/{label}" for stage in ("finetune", "evaluate") for label in guided
        } | {"report"}, override


def perturbed(value):
    """Other values of the same type, most likely first (None when there is none to try)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value + 2, max(value - 1, 0)]
    if isinstance(value, float):
        return [value * 0.5 + 0.01, value * 1.5 + 0.01, min(value * 1.001, 0.999)]
    return None


def test_every_declared_field_is_in_its_stage_hash(tmp_path, registry):
    """Walk each stage's declared reads: changing any field below them changes that stage's hash."""
    from causalimg.config.loader import validate_config
    from causalimg.pipeline import reads
    from causalimg.pipeline.graph import SEED_READ
    from causalimg.pipeline.stages import data, evaluate, finetune, flows, predictors, pretrain

    config = tiny(tmp_path, registry)
    declared = {
        "data": data.READS, "flows": flows.READS, "predictors/guidance-segmentor": predictors.SEGMENTOR_READS,
        "predictors/regressor": predictors.REGRESSOR_READS, "pretrain": pretrain.reads(),
        "finetune/regressor": finetune.reads("regressor"), "evaluate/regressor": evaluate.reads(),
    }  # fmt: skip
    base = hashes(config, registry)
    raw = config.model_dump(mode="json")
    checked = 0
    for stage, paths in declared.items():
        for leaf in reads.leaf_paths(config, (*paths, SEED_READ)):
            parts = leaf.split(".")
            node = raw
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            key = int(parts[-1]) if isinstance(node, list) else parts[-1]
            old = node[key]
            for candidate in perturbed(old) or []:
                node[key] = candidate
                try:
                    changed = validate_config(raw, registry)
                except Exception:
                    continue
                finally:
                    node[key] = old
                assert hashes(changed, registry)[stage] != base[stage], f"{stage}: {leaf}"
                checked += 1
                break
    assert checked > 60  # numbers and switches of every stage were perturbed


def test_a_stage_body_cannot_read_undeclared_config(tmp_path, registry):
    from causalimg.pipeline.reads import UndeclaredConfigRead, view

    config = tiny(tmp_path, registry)
    guarded = view(config, ("pretrain", "finetune.strategies.none"), "pretrain")
    assert guarded.pretrain.steps == config.pretrain.steps and guarded.finetune.strategies["none"] == []
    with pytest.raises(UndeclaredConfigRead, match="finetune.train"):
        _ = guarded.finetune.train
    with pytest.raises(UndeclaredConfigRead, match="'flows'"):
        _ = guarded.flows


def test_partly_given_sections_keep_their_own_defaults(tmp_path, registry):
    config = tiny(tmp_path, registry, "flows_train={steps: 5}", "finetune.train={steps: 5}")
    assert config.flows_train.ema_decay == 0.99 and config.flows_train.batch_size == 256
    assert config.finetune.train.lr == 1e-4


FLOW = "{name: flow-matching, widths: [8, 16], blocks: [1, 1], embed_dim: 16, steps: 2}"


def test_a_compared_mechanism_leaves_the_shared_stages_and_the_main_mechanism_alone(tmp_path, registry):
    """Adding a mechanism labels the per-mechanism stages; shared stages keep their names and hashes,
    and changing one mechanism redoes only its own pretrain, finetune and evaluate stages."""
    single = hashes(tiny(tmp_path, registry), registry)
    both = hashes(tiny(tmp_path, registry, f"compare_mechanisms={{fm: {FLOW}}}"), registry)
    shared = [
        "data",
        "flows",
        "predictors/guidance-segmentor",
        "predictors/evaluation-segmentor",
        "predictors/regressor",
    ]
    assert all(both[name] == single[name] for name in shared)
    steps = hashes(
        tiny(tmp_path, registry, f"compare_mechanisms={{fm: {FLOW}}}", "compare_mechanisms.fm.steps=3"), registry
    )
    assert {name for name in both if steps[name] != both[name]} == {
        "pretrain/fm", "report", *(f"{stage}/fm/{label}" for stage in ("finetune", "evaluate")
                                   for label in ("none", "regressor", "positional-segmentor")),
    }  # fmt: skip


def test_a_mechanism_with_its_own_fine_tuning_settings_redoes_only_its_own_fine_tuning(tmp_path, registry):
    """A ``finetune.per_mechanism`` entry starts from ``finetune.train`` and ``finetune.constraint``, its
    own values win, the resolved config keeps them, and it changes only that mechanism's stages."""
    both = tiny(tmp_path, registry, f"compare_mechanisms={{fm: {FLOW}}}")
    own = tiny(tmp_path, registry, f"compare_mechanisms={{fm: {FLOW}}}",
               "finetune.per_mechanism={fm: {train: {lr: 0.002}, constraint: {damping: 1.0}}}")  # fmt: skip
    entry, shared = own.finetune.per_mechanism["fm"], own.finetune
    assert entry.train == shared.train.model_copy(update={"lr": 0.002})
    assert entry.constraint == shared.constraint.model_copy(update={"damping": 1.0})
    resolved = tmp_path / "resolved.yaml"  # as the run folder keeps it: every value of the entry written out
    resolved.write_text(dump_config(own))
    assert load_config(resolved, [], registry) == own
    before, after = hashes(both, registry), hashes(own, registry)
    changed = {name for name in before if before[name] != after[name]}
    labels = [label for label, terms in own.finetune.strategies.items() if terms]  # No-CFT is not fine-tuned
    assert changed == {f"{stage}/fm/{label}" for stage in ("finetune", "evaluate") for label in labels} | {"report"}
    # the shared settings still reach every mechanism without an entry of its own, and no other
    shared_lr = hashes(tiny(tmp_path, registry, f"compare_mechanisms={{fm: {FLOW}}}", "finetune.train.lr=0.003",
                        "finetune.per_mechanism={fm: {train: {lr: 0.002}, constraint: {damping: 1.0}}}"), registry)  # fmt: skip
    assert {name for name in after if shared_lr[name] != after[name]} == {
        f"{stage}/hvae/{label}" for stage in ("finetune", "evaluate") for label in labels
    } | {"report"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.per_mechanism={flow: {train: {lr: 0.001}}}", "'flow' is not an image mechanism of this run"),
        ("finetune.per_mechanism={fm: {train: {lr: -1}}}", r"finetune\.per_mechanism\.fm\.train\.lr = -1"),
        ("finetune.per_mechanism={fm: {trian: {lr: 1}}}", "did you mean 'train'"),
    ],
)
def test_bad_per_mechanism_fine_tuning_settings_are_config_errors(tmp_path, registry, override, message):
    from causalimg.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, registry, f"compare_mechanisms={{fm: {FLOW}}}", override)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (f"compare_mechanisms={{hvae: {FLOW}}}", "is image_mechanism's own"),
        (f"compare_mechanisms={{Flow: {FLOW}}}", "must be lower case"),
        ("compare_mechanisms={fm: {name: diffusion}}", "diffusion"),
        ("compare_mechanisms={fm: {name: flow-matching, solver: leapfrog}}", "compare_mechanisms.fm.solver"),
    ],
)
def test_bad_compared_mechanisms_are_config_errors(tmp_path, registry, override, message):
    from causalimg.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, registry, override)


@pytest.mark.slow
def test_two_image_mechanisms_in_one_run_share_data_and_predictors_and_one_report(tmp_path, registry):
    from causalimg import CounterfactualModel

    config = tiny(
        tmp_path, registry, f"compare_mechanisms={{fm: {FLOW}}}", "finetune.per_mechanism={fm: {train: {steps: 3}}}"
    )
    results = run_pipeline(config, registry)
    strategies = list(config.finetune.strategies)
    steps = {m: results[f"finetune/{m}/regressor"]["summary"]["steps"] for m in ("hvae", "fm")}
    assert steps == {"hvae": config.finetune.train.steps, "fm": 3}  # each mechanism with its own settings
    models = [f"{m}/{s}" for m in ("hvae", "fm") for s in strategies]
    assert [name for name in results if name.startswith("evaluate/")] == [f"evaluate/{m}" for m in models]
    assert sum(name.startswith("pretrain") for name in results) == 2 and "data" in results
    run = tmp_path / "run"
    (run / "config.yaml").write_text(dump_config(config))  # what `python -m causalimg.run` leaves for the API
    report = json.loads((run / "report" / "results.json").read_text())
    assert set(report["strategies"]) == set(models)
    pairs = {(d["earlier"], d["later"]) for d in report["paired"]}
    within = {
        (f"{m}/{a}", f"{m}/{b}") for m in ("hvae", "fm") for i, a in enumerate(strategies) for b in strategies[i + 1 :]
    }
    across = {(f"hvae/{s}", f"fm/{s}") for s in strategies}
    assert pairs == within | across  # never one mechanism's strategy against another's
    table = (run / "report" / "table1.md").read_text()
    assert all(f"| {m} |" in table for m in models)
    assert sum("on the intervened region for" in line for line in report["findings"]) == 4  # 2 mechanisms x 2 measures
    # the API loads either mechanism's model by its label; the flow-matching one is not the HVAE
    flow = CounterfactualModel.from_pretrained(run, "fm/positional-segmentor")
    hvae = CounterfactualModel.from_pretrained(run, "hvae/positional-segmentor")
    assert type(flow.dscm.image).__name__ == "FlowMatching" and type(hvae.dscm.image).__name__ == "HVAE"
    images = load_tensors(run / "evaluate" / "fm" / "none" / "figure.safetensors")["factual"][None]  # (1, 1, H, W)
    out = flow.counterfactual(images, do={"cpa_mid": "+1"}, clamp=True)
    assert out.images.shape == images.shape
    # the main mechanism trains exactly as it does alone: the comparison costs it nothing
    alone = tmp_path / "alone"
    run_pipeline(
        tiny(tmp_path, registry, f"run.dir={alone}", "finetune.strategies={regressor: [{name: regressor}]}"), registry
    )
    for stage, labelled in (("pretrain", "pretrain/hvae"), ("finetune/regressor", "finetune/hvae/regressor")):
        expected = load_tensors(alone / stage / "weights.safetensors")
        found = load_tensors(run / labelled / "weights.safetensors")
        assert all(torch.equal(expected[k], found[k]) for k in expected), stage
