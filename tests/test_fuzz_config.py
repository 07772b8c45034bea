"""Property-based fuzz of configs through the real command lines (``causalimg validate`` and
``python -m causalimg.run``): every bad config exits 2 with a short message that names the file or
field, never a traceback, and the run directory is never created for a config that is refused.

The base config uses the toy one-file plugin alone (``CAUSALIMG_PLUGINS_ONLY=toy``), so each
example loads in milliseconds; one mutation per example.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TOY_CONFIG, TOY_PLUGIN
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from causalimg import cli, run
from causalimg.config.loader import apply_overrides, load_config, read_config_file
from causalimg.config.sections import TrainConfig
from causalimg.errors import ConfigError
from causalimg.plugins.manager import ENV_ONLY
from causalimg.strict import MAX_SEED

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAX_LINES = 25  # one screen
ENTRIES = st.sampled_from(["validate", "run"])

NOT_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])

# (dotted field, values outside its range): the constrained numbers of the fixed sections; inf and
# NaN pass a bound such as `> 0` and must be refused on their own.
OUT_OF_RANGE: dict[str, st.SearchStrategy[Any]] = {
    "run.seed": st.integers(max_value=-1) | st.integers(min_value=MAX_SEED + 1),
    "pretrain.steps": st.integers(max_value=0),
    "pretrain.batch_size": st.integers(max_value=0),
    "pretrain.lr": st.floats(max_value=0.0) | NOT_FINITE,
    "pretrain.weight_decay": st.floats(max_value=-1e-9, allow_infinity=True) | NOT_FINITE,
    "pretrain.ema_decay": st.floats(min_value=1.0) | st.floats(max_value=-1e-9) | NOT_FINITE,
    "pretrain.max_skip_fraction": st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True),
    "pretrain.grad_clip": st.floats(max_value=0.0) | NOT_FINITE,
    "finetune.temperature": st.floats(max_value=0.0) | NOT_FINITE,
    "finetune.constraint.damping": st.floats(max_value=-1e-9) | NOT_FINITE,
    "flows_train.warmup_steps": st.integers(max_value=-1),
}
NUMERIC_FIELDS = tuple(OUT_OF_RANGE)
PLUGIN_SECTIONS = {"data": "toy-data", "regions": "toy-halves", "flows": "toy-flow", "image_mechanism": "toy-vae"}
SECTION_FIELDS = {  # the fields a fuzzed unknown key must not hit
    "": {
        "run",
        "plugins",
        "data",
        "regions",
        "flows",
        "image_mechanism",
        "flows_train",
        "pretrain",
        "predictors",
        "finetune",
        "evaluate",
        "tracking",
    },
    "run": {"dir", "seed"},
    "pretrain": set(TrainConfig.model_fields),
    "data": {"name", "size"},
}


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
WRONG_TYPES = st.one_of(
    TEXT.filter(_not_a_number),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.integers(), min_size=1, max_size=2),
)
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz_plugins")
    (folder / "toy.py").write_text(TOY_PLUGIN)
    return folder


@pytest.fixture
def env(plugin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The toy plugin alone, a base config that is valid, and where a run would write."""
    monkeypatch.setenv(ENV_ONLY, "toy")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "exp"
    base = {**TOY_CONFIG, "plugins": {"dirs": [str(plugin_dir)]}, "run": {"dir": str(run_dir), "seed": 0}}
    return {"base": base, "run_dir": run_dir, "tmp": tmp_path}


def write_config(env: dict[str, Any], raw: Any, name: str = "exp.yaml") -> Path:
    path = env["tmp"] / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def invoke(entry: str, path: Path, overrides: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    argv = ["validate", str(path)] if entry == "validate" else ["--config", str(path)]
    argv += [f"--set={text}" for text in overrides]
    code = cli.main(argv) if entry == "validate" else run.main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, env: dict[str, Any], *needles: str) -> None:
    """Exit 2, one short message without a traceback, naming every needle; nothing written."""
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith(("causalimg: error:", "causalimg.run: error:")), err
    assert len(err.splitlines()) <= MAX_LINES, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not env["run_dir"].exists(), "a refused config created the run directory"


def with_value(base: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    raw = yaml.safe_load(yaml.safe_dump(base))
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def test_base_config_and_every_fuzzed_field_are_valid(env, capsys):
    """The fuzz starts from a valid config, and each fuzzed field exists with a valid value (the toy
    plugin's components build nothing, so this checks the config alone, not the run's preflight)."""
    load_config(write_config(env, env["base"]))
    valid = {
        "run.seed": 3,
        "pretrain.lr": 0.5,
        "pretrain.ema_decay": 0.0,
        "pretrain.max_skip_fraction": 1.0,
        "pretrain.weight_decay": 0.0,
        "pretrain.steps": 1,
        "pretrain.batch_size": 1,
        "pretrain.grad_clip": 1e-3,
        "finetune.temperature": 1e3,
        "finetune.constraint.damping": 0.0,
        "flows_train.warmup_steps": 0,
    }
    assert set(valid) == set(NUMERIC_FIELDS)
    for dotted, value in valid.items():
        load_config(write_config(env, with_value(env["base"], dotted, value)))


@SETTINGS
@given(entry=ENTRIES, field=st.sampled_from(NUMERIC_FIELDS), value=WRONG_TYPES, via_set=st.booleans())
def test_wrong_types_name_the_field(env, capsys, entry, field, value, via_set):
    if via_set:
        # --set reads values as YAML: blanks around the value are not part of it
        assume(not isinstance(value, str) or (value and value.strip() == value))
        typed = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")
        code, err = invoke(entry, write_config(env, env["base"]), [f"{field}={typed}"], capsys)
    else:
        code, err = invoke(entry, write_config(env, with_value(env["base"], field, value)), [], capsys)
    assert_refused(code, err, env, f"{field} = ")


@SETTINGS
@given(entry=ENTRIES, data=st.data(), via_set=st.booleans())
def test_out_of_range_numbers_name_the_field_and_value(env, capsys, entry, data, via_set):
    field = data.draw(st.sampled_from(NUMERIC_FIELDS))
    value = data.draw(OUT_OF_RANGE[field])
    if via_set:
        typed = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        code, err = invoke(entry, write_config(env, env["base"]), [f"{field}={typed}"], capsys)
        assert_refused(code, err, env, f"{field} = ", f"(from --set {field}={typed})", "invalid config from --set")
    else:
        code, err = invoke(entry, write_config(env, with_value(env["base"], field, value)), [], capsys)
        assert_refused(code, err, env, f"{field} = ", "exp.yaml")


@SETTINGS
@given(entry=ENTRIES, section=st.sampled_from(sorted(SECTION_FIELDS)), key=IDENT)
def test_unknown_keys_are_named_with_the_valid_fields(env, capsys, entry, section, key):
    assume(key not in SECTION_FIELDS[section])
    base = {**env["base"], "data": {"name": "toy-data"}}  # not the `data: toy-data` shorthand
    raw = with_value(base, f"{section}.{key}" if section else key, 1)
    where = f"{section}.{key}" if section else key
    code, err = invoke(entry, write_config(env, raw), [], capsys)
    assert_refused(code, err, env, f"{where}: unknown field")


@SETTINGS
@given(
    entry=ENTRIES,
    section=st.sampled_from(sorted(PLUGIN_SECTIONS)),
    name=st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True),
    via_set=st.booleans(),
)
def test_unknown_plugin_names_list_the_valid_ones(env, capsys, entry, section, name, via_set):
    assume(not name.startswith("toy-"))
    if via_set:
        code, err = invoke(entry, write_config(env, env["base"]), [f"{section}.name={name}"], capsys)
    else:
        code, err = invoke(entry, write_config(env, {**env["base"], section: name}), [], capsys)
    shown = f"{section}.name = {name!r}" if via_set else f"{section} = {name!r}"  # the shorthand is shown as typed
    assert_refused(code, err, env, shown, PLUGIN_SECTIONS[section])


BAD_OVERRIDES = st.one_of(
    TEXT.filter(lambda t: "=" not in t),  # no '='
    st.tuples(st.sampled_from(["", ".", "a..b", "run.", ".seed", " . "]), TEXT).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.sampled_from(
        [
            "[1, 2",
            "{a: ",
            "'open",
            ": :",
            "!!python/object/apply:os.system ['true']",
            "!!python/name:os.system",
            "*alias",
        ]
    ).map(lambda v: f"run.seed={v}"),  # not YAML / unsafe
    IDENT.map(lambda key: f"run.seed.{key}=1"),  # through a scalar
    IDENT.filter(lambda k: k not in SECTION_FIELDS[""]).map(lambda key: f"{key}.x=1"),  # unknown section
)


@SETTINGS
@given(entry=ENTRIES, text=BAD_OVERRIDES)
def test_bad_overrides_name_the_override(env, capsys, entry, text):
    code, err = invoke(entry, write_config(env, env["base"]), [text], capsys)
    top = text.partition("=")[0].split(".")[0]
    assert_refused(code, err, env)
    assert repr(text) in err or f"(from --set {text})" in err or (top and f"  {top}: unknown field" in err), err


@SETTINGS
@given(entry=ENTRIES, content=st.binary(max_size=300), suffix=st.sampled_from([".yaml", ".toml"]))
def test_binary_and_random_files_name_the_file(env, capsys, entry, content, suffix):
    path = env["tmp"] / f"random{suffix}"
    path.write_bytes(content)
    code, err = invoke(entry, path, [], capsys)
    assert_refused(code, err, env, str(path))


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=3),
    max_leaves=6,
)


@SETTINGS
@given(entry=ENTRIES, value=YAML_VALUES)
def test_non_mapping_yaml_is_refused(env, capsys, entry, value):
    path = write_config(env, value, "scalar.yaml")
    code, err = invoke(entry, path, [], capsys)
    assert_refused(code, err, env, str(path))
    assert "mapping" in err or "empty" in err or "only comments" in err


@pytest.mark.parametrize("content", [b"", b"   \n\t\n", b"# only a comment\n", b"\0\0\0", b"\xff\xfe\x00a"])
@pytest.mark.parametrize("entry", ["validate", "run"])
def test_empty_and_binary_files_name_the_file(env, capsys, entry, content):
    path = env["tmp"] / "exp.yaml"
    path.write_bytes(content)
    code, err = invoke(entry, path, [], capsys)
    assert_refused(code, err, env, str(path))
    assert any(word in err for word in ("empty", "binary", "only comments")), err


# Pieces of YAML and TOML that the parsers, composers and constructors treat specially: anchors,
# aliases, merge keys, complex keys, explicit tags, directives, block scalars, huge numbers.
FRAGMENTS = [
    "a: ", "&x ", "*x", "<<: ", "[", "]", "{", "}", ", ", "\n", "  ", "- ", "? ", ": ", "=", "\t", "#c\n",
    "!!str ", "!!int ", "!!float ", "!!binary ", "!!set ", "!!omap ", "!!timestamp ", "!!python/none ",
    "!<tag:yaml.org,2002:int> ", "1" * 5000, "1e999", ".nan", "-.inf", "0x" + "f" * 5000, "0o7", "1_000",
    "'q'", '"\\x00"', "~", "null", "2001-12-14t21:59:43.10-05:00", "12:30:00", "%YAML 1.1\n---\n", "---\n",
    "...\n", "|\n  t\n", ">\n  t\n", "k: v", "&y [*y]", "*y", "[section]\n", "k = 1\n", "\ufeff",
]  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True)
@given(pieces=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=30), suffix=st.sampled_from([".yaml", ".toml"]))
def test_any_document_is_loaded_or_refused_with_a_config_error(tmp_path_factory, pieces, suffix):
    """The loader's one way to fail is a ConfigError of a few hundred characters: no ValueError,
    IndexError, AttributeError or RecursionError escapes from the parsers and constructors."""
    text = "".join(pieces)
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    path.write_text(text)
    for load in (lambda: read_config_file(path), lambda: apply_overrides({}, [f"run={text}"])):
        try:
            load()
        except ConfigError as err:
            assert len(str(err)) <= 600, str(err)


PYTHON_TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "run: !!python/object/apply:os.system ['touch {marker}']",
    "run:\n  dir: !!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    "data: !!python/name:os.system\n",
    "!!python/module:os\n",
]


@pytest.mark.parametrize("payload", PYTHON_TAGS)
@pytest.mark.parametrize("entry", ["validate", "run"])
def test_yaml_python_tags_are_refused_by_safe_loading(env, capsys, entry, payload):
    marker = env["tmp"] / "pwned"
    path = env["tmp"] / "evil.yaml"
    path.write_text(payload.format(marker=marker))
    code, err = invoke(entry, path, [], capsys)
    assert_refused(code, err, env, str(path), "invalid YAML")
    assert not marker.exists()


@pytest.mark.slow  # starts Python twice (about 5-20 s, depending on load)
@pytest.mark.parametrize(
    ("argv", "content", "needle"),
    [
        (["-m", "causalimg.run", "--config"], b"\x89PNG\r\n\x1a\n\0\0binary", "binary"),
        (["-m", "causalimg", "validate"], b"!!python/object/apply:os.system ['touch {marker}']", "invalid YAML"),
    ],
)
def test_console_commands_exit_2_without_traceback(tmp_path, argv, content, needle):
    marker = tmp_path / "pwned"
    path = tmp_path / "exp.yaml"
    path.write_bytes(content.replace(b"{marker}", str(marker).encode()))
    result = subprocess.run(
        [sys.executable, *argv, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and str(path) in result.stderr and needle in result.stderr
    assert len(result.stderr.splitlines()) <= MAX_LINES and not marker.exists()
