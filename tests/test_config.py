"""Config loading: the run config tree, file formats, overrides and the errors users see."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from conftest import TOY_CONFIG
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from causalimg.config.loader import (
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    resolve_config_path,
    shipped_configs,
    switched_components,
    validate_config,
)
from causalimg.config.run import build_run_config_model
from causalimg.errors import ConfigError, PluginError
from causalimg.plugins.manager import Registry, load_registry


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def config_error(raw: dict, registry: Registry, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(apply_overrides(raw, overrides), registry, "exp.yaml", overrides)
    return str(err.value)


def test_minimal_config_validates_with_defaults_and_is_frozen(toy_registry):
    config = validate_config(TOY_CONFIG, toy_registry)
    assert config.regions.name == "toy-halves" and config.image_mechanism.widths == (8, 16)
    assert config.finetune.strategies == {"none": []} and config.finetune.temperature == 0.1
    assert [m.name for m in config.evaluate.metrics] == ["toy-metric"]  # every metric by default
    with pytest.raises(ValidationError, match="frozen"):
        config.run.seed = 3


def test_unknown_key_names_dotted_location_and_suggests(toy_registry):
    message = config_error({**TOY_CONFIG, "pretrain": {"stpes": 3}}, toy_registry)
    assert "exp.yaml" in message and "pretrain.stpes: unknown field" in message and "did you mean 'steps'" in message


def test_unknown_key_inside_a_plugin_section_has_no_union_tag(toy_registry):
    message = config_error({**TOY_CONFIG, "image_mechanism": {"name": "toy-vae", "widht": [4]}}, toy_registry)
    assert "image_mechanism.widht: unknown field" in message and "did you mean 'widths'" in message


def test_wrong_type_shows_location_and_value(toy_registry):
    message = config_error({**TOY_CONFIG, "data": {"name": "toy-data", "size": "big"}}, toy_registry)
    assert "data.size = 'big': Input should be a valid integer" in message


def test_misspelled_plugin_name_lists_valid_names(toy_registry):
    message = config_error({**TOY_CONFIG, "regions": {"name": "toy-halfs"}}, toy_registry)
    assert "regions.name = 'toy-halfs'" in message
    assert "did you mean 'toy-halves'" in message and "valid names: toy-halves" in message


def test_misspelled_guidance_in_a_strategy_is_located(toy_registry):
    raw = {**TOY_CONFIG, "finetune": {"strategies": {"pos": [{"name": "toy-guid", "weight": 2}]}}}
    assert "finetune.strategies.pos.0.name = 'toy-guid'" in config_error(raw, toy_registry)


def test_missing_plugin_section_lists_the_choices(toy_registry):
    raw = {k: v for k, v in TOY_CONFIG.items() if k != "flows"}
    assert "flows: missing: choose a attribute_mechanism by name: toy-flow" in config_error(raw, toy_registry)


def test_kind_without_plugins_is_a_clear_error():
    registry = Registry({})
    model = build_run_config_model(registry)
    with pytest.raises(ValidationError, match="no partitioner plugins are registered"):
        model.model_validate({"regions": {"name": "grid"}})


def test_guidance_config_without_weight_is_a_plugin_error(toy_registry):
    spec = toy_registry.get("guidance", "toy-guide")
    no_weight = type(
        "NoWeight",
        (spec.config.__base__,),
        {"__annotations__": {"name": spec.config.model_fields["name"].annotation}, "name": "toy-guide"},
    )
    registry = Registry({"guidance": {"toy-guide": type(spec)("toy-guide", no_weight, object, "no weight")}})
    with pytest.raises(PluginError, match="toy-guide.*weight: float = 1.0"):
        build_run_config_model(registry)


def test_bad_strategy_label_is_rejected(toy_registry):
    assert "strategy label 'Pos Seg'" in config_error(
        {**TOY_CONFIG, "finetune": {"strategies": {"Pos Seg": []}}}, toy_registry
    )


@pytest.mark.parametrize("override", ["run.seed", "=3", "run..seed=1", ".seed=1"])
def test_bad_override_syntax(override):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override(override)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="run.seed is 0, not a section"):
        apply_overrides({"run": {"seed": 0}}, ["run.seed.x=1"])


def test_override_expands_plugin_shorthand():
    assert apply_overrides({"regions": "grid"}, ["regions.rows=2"]) == {"regions": {"name": "grid", "rows": 2}}


def test_unknown_override_path_is_reported_with_its_override(toy_registry):
    message = config_error(TOY_CONFIG, toy_registry, ["run.sed=3"])
    assert "run.sed: unknown field" in message and "(from --set run.sed=3)" in message


def test_override_sets_list_items_and_yaml_values():
    raw = {"evaluate": {"metrics": [{"name": "a"}, {"name": "b"}]}}
    result = apply_overrides(raw, ["evaluate.metrics.1.name=c", "predictors.segmentor.widths=[4, 8]"])
    assert result["evaluate"]["metrics"][1] == {"name": "c"}
    assert result["predictors"]["segmentor"]["widths"] == [4, 8]
    assert raw["evaluate"]["metrics"][1] == {"name": "b"}  # the input is not changed
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(raw, ["evaluate.metrics.5.name=c"])


FILE = {
    "data": {"name": "phantom", "n_train": 32},
    "regions": "axial-thirds",
    "evaluate": {"metrics": [{"name": "effectiveness"}, {"name": "composition", "cycles": [1, 2]}]},
    "finetune": {"strategies": {"pos": [{"name": "positional-segmentor", "gradient_temperature": 2}]}},
}


@pytest.mark.parametrize(
    ("overrides", "switched"),
    [
        (["data.name=folder"], {("data",): "data.name=folder"}),
        (["data.name=phantom"], {}),  # the same component: the file's fields stay
        (["regions.name=grid"], {("regions",): "regions.name=grid"}),  # from the shorthand
        (["flows.name=other"], {}),  # not in the file: nothing to drop
        (["evaluate.metrics.1.name=realism"], {("evaluate", "metrics", "1"): "evaluate.metrics.1.name=realism"}),
        (
            ["finetune.strategies.pos.0.name=regressor"],
            {("finetune", "strategies", "pos", "0"): "finetune.strategies.pos.0.name=regressor"},
        ),
        (["data.name=folder", "data={name: phantom}"], {}),  # the whole section replaced after it
        (["data.name=folder", "data.name=phantom"], {}),  # the last name is the file's
        (["run.name=x"], {}),  # not a component's name
    ],
)
def test_switched_components(overrides, switched):
    assert switched_components(FILE, overrides) == switched


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
def test_switching_a_component_keeps_the_other_overrides_in_any_order(order):
    given = ["data.path=scans", "data.name=folder", "data.spacing_mm=0.5"]
    result = apply_overrides(FILE, [given[i] for i in order])
    assert result["data"] == {"name": "folder", "path": "scans", "spacing_mm": 0.5}
    assert FILE["data"] == {"name": "phantom", "n_train": 32}  # the input is not changed


def test_switching_a_metric_or_a_term_empties_only_that_item():
    result = apply_overrides(FILE, ["evaluate.metrics.1.name=realism", "finetune.strategies.pos.0.name=regressor"])
    assert result["evaluate"]["metrics"] == [{"name": "effectiveness"}, {"name": "realism"}]
    assert result["finetune"]["strategies"]["pos"] == [{"name": "regressor"}]


keys = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
values = st.one_of(
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12),
    st.lists(st.integers(), max_size=4),
)


def as_override_value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("...").strip()


@settings(max_examples=150, deadline=None)
@given(st.lists(keys, min_size=1, max_size=4), values)
def test_override_round_trip(path, value):
    result = apply_overrides({}, [f"{'.'.join(path)}={as_override_value(value)}"])
    for key in path:
        result = result[key]
    assert result == value


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(keys, st.integers(), max_size=4), keys, st.integers())
def test_override_keeps_sibling_fields(section, key, value):
    result = apply_overrides({"s": section}, [f"s.{key}={value}"])
    assert result["s"] == {**section, key: value}


def test_yaml_and_toml_give_the_same_config(toy_registry, tmp_path):
    raw = {**TOY_CONFIG, "run": {"seed": 7}}
    toml = tmp_path / "exp.toml"
    toml.write_text(
        'data = "toy-data"\nregions = "toy-halves"\nflows = "toy-flow"\nimage_mechanism = "toy-vae"\n[run]\nseed = 7\n'
    )
    assert load_config(toml, registry=toy_registry) == load_config(
        write(tmp_path / "exp.yaml", raw), registry=toy_registry
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"# only a comment\n", "only comments"),
        (b"\x00\x01\x02binary", "is binary"),
        (b"- a\n- b\n", "mapping of sections, not a list"),
        (b"run: {seed: 1\n", "line 2"),
    ],
)
def test_unusable_files_are_named(tmp_path, toy_registry, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path, registry=toy_registry)
    assert str(path) in str(err.value)


def test_missing_file_and_unknown_suffix(tmp_path, toy_registry):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", registry=toy_registry)
    (tmp_path / "exp.json").write_text("{}")
    with pytest.raises(ConfigError, match="unknown format '.json'"):
        load_config(tmp_path / "exp.json", registry=toy_registry)
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        resolve_config_path("no-such-shipped-config")


def test_relative_run_dir_resolves_against_cwd(toy_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = validate_config({**TOY_CONFIG, "run": {"dir": "runs/a"}}, toy_registry)
    assert config.run.dir == tmp_path.resolve() / "runs" / "a"
    with pytest.raises(ConfigError, match=r"run.dir = '../elsewhere' leaves the working directory"):
        validate_config({**TOY_CONFIG, "run": {"dir": "../elsewhere"}}, toy_registry)
    outside = tmp_path.parent / "elsewhere"
    assert validate_config({**TOY_CONFIG, "run": {"dir": str(outside)}}, toy_registry).run.dir == outside


def test_resolved_config_round_trips(toy_registry, tmp_path):
    raw = {**TOY_CONFIG, "finetune": {"strategies": {"none": [], "guided": [{"name": "toy-guide", "weight": 0.5}]}}}
    config = load_config(write(tmp_path / "exp.yaml", raw), ["pretrain.steps=5"], toy_registry)
    reloaded = load_config(
        write(tmp_path / "resolved.yaml", yaml.safe_load(dump_config(config))), registry=toy_registry
    )
    assert reloaded == config


def test_plugin_dirs_in_the_config_are_loaded(toy_plugin_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CAUSALIMG_PLUGINS_ONLY", "toy")
    config = load_config(write(tmp_path / "exp.yaml", {**TOY_CONFIG, "plugins": {"dirs": [str(toy_plugin_dir)]}}))
    assert config.data.name == "toy-data"


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_configs_validate(name):
    config = load_config(name, registry=load_registry())
    assert config.finetune.strategies
