"""Config input that must be refused before any work starts (issue 17, the config's side).

The probes that failed at ``tiny`` size (inf/NaN numbers, a seed beyond the generators' range, an
empty segmentor, an unknown timm model, a repeated guidance term) go through both command lines
and are refused with exit 2, one short message, no traceback and no run folder. The loader's
limits (YAML alias bombs, nesting, duplicate keys, file size, message length) are checked with
the bounds the issue sets: a billion-laughs file is refused within 5 s and 500 MB.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TOY_CONFIG, TOY_PLUGIN
from pydantic import BaseModel, ValidationError

from causalimg import cli, run
from causalimg.config.loader import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_ERRORS,
    apply_overrides,
    load_config,
    load_yaml,
    read_config_file,
    resolve_config_path,
    validate_config,
)
from causalimg.config.run import build_run_config_model
from causalimg.errors import ConfigError
from causalimg.plugins.manager import Registry, get_plugin_manager, load_registry
from causalimg.predictors.configs import RegressorConfig, SegmentorConfig
from causalimg.strict import MAX_SEED, StrictModel

MAX_CHARS = 600  # "one message of at most a few hundred characters"

# The issue's probes that the config alone decides: (override, what the message must say).
PROBES = [
    ("finetune.temperature=.inf", "finetune.temperature = inf: Input should be a finite number"),
    ("pretrain.lr=.inf", "pretrain.lr = inf: Input should be a finite number"),
    ("pretrain.grad_clip=.inf", "pretrain.grad_clip = inf: Input should be a finite number"),
    ("pretrain.betas=[.nan, 0.999]", "pretrain.betas.0 = nan: Input should be a finite number"),
    (
        "finetune.strategies.twice=[{name: segmentor}, {name: segmentor, weight: 2}]",
        "guidance appears more than once ('segmentor' at 0 and 1)",
    ),
    ("predictors.segmentor.widths=[]", "predictors.segmentor.widths = []: Tuple should have at least 2 items"),
    (f"run.seed={2**70}", f"run.seed = {2**70}: Input should be less than or equal to {MAX_SEED}"),
    ("predictors.regressor.model=resnet19", "predictors.regressor.model = 'resnet19': not a timm model"),
]

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The built-in plugins (and installed ones): what the probes ran against."""
    return load_registry()


@pytest.fixture(scope="module")
def builtin() -> Registry:
    """The built-in plugins alone: the config models causalimg itself ships."""
    return Registry.from_manager(get_plugin_manager(builtin_only=True))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: the tiny config's relative run.dir would be created here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(entry: str, config: str, overrides: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of one command line; it must not write into the working directory."""
    before = set(Path.cwd().rglob("*"))
    argv = [f"--set={text}" for text in overrides]
    code = cli.main(["validate", config, *argv]) if entry == "validate" else run.main(["--config", config, *argv])
    err = capsys.readouterr().err
    if code != 0:
        assert set(Path.cwd().rglob("*")) == before, f"a refused config wrote to the working directory:\n{err}"
    return code, err


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit 2, one message of a few hundred characters without a traceback."""
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert len(err) <= MAX_CHARS, f"{len(err)} characters:\n{err}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


def tiny_with(override: str) -> dict[str, Any]:
    return apply_overrides(read_config_file(resolve_config_path("tiny")), [override])


@pytest.mark.parametrize(("override", "needle"), PROBES, ids=[p[0].split("=")[0] for p in PROBES])
@pytest.mark.parametrize("entry", ["validate", "run"])
def test_issue_probes_are_refused_from_set_before_anything_runs(workdir, capsys, registry, entry, override, needle):
    code, err = invoke(entry, "tiny", [override], capsys)
    assert_refused(code, err, needle, f"(from --set {override})", "invalid config from --set")
    assert "tiny.yaml" not in err  # the value came from the override, not from the file


@pytest.mark.parametrize(("override", "needle"), PROBES, ids=[p[0].split("=")[0] for p in PROBES])
@pytest.mark.parametrize("entry", ["validate", "run"])
def test_issue_probes_are_refused_from_a_file_before_anything_runs(workdir, capsys, registry, entry, override, needle):
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_with(override), sort_keys=False))
    code, err = invoke(entry, str(path), [], capsys)
    assert_refused(code, err, needle, f"invalid config {path} (1 error)")
    assert "--set" not in err


def test_the_probes_fields_accept_valid_values(workdir, capsys, registry):
    """Each probe differs from a valid config in its one value (so the refusals are about it)."""
    valid = [
        "finetune.temperature=1e-3",
        "pretrain.lr=1e300",
        "pretrain.betas=[0.0, 0.999999]",
        "finetune.strategies.once=[{name: segmentor}, {name: positional-segmentor}]",
        "predictors.segmentor.widths=[4, 8]",
        f"run.seed={MAX_SEED}",
        f"data.seed={MAX_SEED}",
        "predictors.regressor.model=resnet18.a1_in1k",  # a pretrained tag: timm builds it without weights
    ]
    for override in valid:
        assert invoke("validate", "tiny", [override], capsys)[0] == 0, override
    for override in [f"run.seed={MAX_SEED + 1}", f"data.seed={MAX_SEED + 1}", "pretrain.betas=[0.9, 1.0]"]:
        code, err = invoke("validate", "tiny", [override], capsys)
        assert_refused(code, err, override.split("=")[0])


def test_unknown_timm_model_lists_close_matches(workdir, capsys, registry):
    code, err = invoke("validate", "tiny", ["predictors.regressor.model=resnet19"], capsys)
    assert_refused(code, err, "did you mean 'resnet18'", "timm.list_models()")


# -- the loader's limits --------------------------------------------------------------------


def child_peak(argv: list[str], cwd: Path) -> tuple[int, float, int, str]:
    """Run ``argv`` from a fresh Python that reports its one child's exit status, wall time and
    peak resident memory (bytes): RUSAGE_CHILDREN of this process would include earlier tests."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "start = time.monotonic()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "seconds = time.monotonic() - start\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps([done.returncode, seconds, peak, done.stderr]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=cwd, timeout=120, check=True
    )
    code, seconds, peak, err = json.loads(result.stdout)
    return code, seconds, peak, err


@pytest.mark.parametrize("via", ["file", "set"])
def test_billion_laughs_is_refused_within_5_s_and_500_mb(tmp_path, via):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    argv = [sys.executable, "-m", "causalimg", "validate"]
    if via == "file":
        argv.append(str(bomb))
    else:  # the same document as one override's value
        argv += ["tiny", "--set", "run={" + BILLION_LAUGHS.strip().replace("\n", ", ") + "}"]
    code, seconds, peak, err = child_peak(argv, tmp_path)
    assert code == 2 and "Traceback" not in err and len(err) <= MAX_CHARS, err
    assert "aliases expand it to more than" in err, err
    assert seconds < 5.0, f"refused after {seconds:.1f} s"
    assert peak < 500 * 2**20, f"peak resident memory {peak / 2**20:.0f} MB"


def chain(levels: int, width: int, item: str) -> str:
    """Each level repeats the one before ``width`` times; ``item`` formats a reference to level n."""
    lines = ['l0: &l0 "lol"']
    for n in range(1, levels + 1):
        lines.append(f"l{n}: &l{n} " + item.format(n=n, refs=", ".join([f"*l{n - 1}"] * width), i="{i}"))
    return "\n".join(lines) + "\n"


BOMBS = {
    "lists": chain(12, 10, "[{refs}]"),
    "mapping values": "\n".join(
        ['l0: &l0 "lol"']
        + [f"l{n}: &l{n} {{" + ", ".join(f"k{i}: *l{n - 1}" for i in range(10)) + "}" for n in range(1, 12)]
    ),
    "merge keys": "\n".join(
        ["m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(10)) + "}"]
        + [f"m{n}: &m{n} {{<<: [" + ", ".join([f"*m{n - 1}"] * 10) + "]}" for n in range(1, 12)]
    ),
    "keys": "\n".join(['k0: &k0 ["lol"]'] + [f"k{n}: &k{n} {{? [*k{n - 1}, *k{n - 1}] : 1}}" for n in range(1, 40)]),
    "recursive": "a: &a [1, *a]\n",
    "deep alias chain": "\n".join(["d0: &d0 [1]"] + [f"d{n}: &d{n} [*d{n - 1}]" for n in range(1, MAX_DEPTH + 5)]),
    "deep nesting": "a: " + "[" * 5000 + "]" * 5000 + "\n",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_alias_bombs_and_deep_documents_are_refused_cheaply(name):
    """Each refused before it is built, in seconds (the scanner reads ahead up to 1,024 characters
    of open brackets; slower under tracemalloc) and a few MB of Python allocations."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(yaml.YAMLError) as err:
            load_yaml(BOMBS[name])
        seconds, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert any(word in str(err.value) for word in ("expand", "contains it", "deeper than")), err.value
    assert seconds < 5.0 and peak < 50 * 2**20, (seconds, peak)


def test_anchors_aliases_and_merge_keys_of_a_real_config_still_load(tmp_path, toy_registry):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "data: toy-data\nregions: toy-halves\nflows: toy-flow\nimage_mechanism: toy-vae\n"
        "pretrain: &train {steps: 7, batch_size: 4, lr: 0.01}\n"
        "flows_train: *train\n"
        "predictors:\n  segmentor:\n    train:\n      <<: *train\n      steps: 9\n"
    )
    config = load_config(path, registry=toy_registry)
    assert config.pretrain.steps == config.flows_train.steps == 7 and config.flows_train.lr == 0.01
    assert config.predictors.segmentor.train.steps == 9 and config.predictors.segmentor.train.batch_size == 4


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("run:\n  seed: 1\npretrain:\n  steps: 3\n  batch_size: 4\n  steps: 2000000\n", "steps", (4, 6)),
        ("run: {seed: 1, seed: 2}\n", "seed", (1, 1)),
        ("pretrain: {steps: 3}\nrun: {seed: 0}\npretrain: {steps: 4}\n", "pretrain", (1, 3)),
    ],
)
def test_a_key_given_twice_in_yaml_is_refused_naming_key_and_lines(tmp_path, text, key, lines):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    message = str(err.value)
    assert f"key {key!r} is given twice in one mapping: on line {lines[0]} and on line {lines[1]}" in message
    assert str(path) in message and len(message) <= MAX_CHARS


def test_yaml_keys_may_repeat_across_mappings_and_after_a_merge(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("a: &a {steps: 1, lr: 0.1}\nb: {<<: *a, steps: 2}\nc: {steps: 3}\n")
    assert read_config_file(path) == {"a": {"steps": 1, "lr": 0.1}, "b": {"steps": 2, "lr": 0.1}, "c": {"steps": 3}}


def test_a_key_given_twice_in_toml_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[pretrain]\nsteps = 3\nsteps = 2000000\n")
    with pytest.raises(ConfigError, match=r"line 3.*'steps = 2000000'"):
        read_config_file(path)


def test_deep_toml_is_refused_without_a_recursion_traceback(tmp_path):
    path = tmp_path / "exp.toml"
    for depth, text in [(5000, "a = " + "[" * 5000 + "]" * 5000), (MAX_DEPTH + 1, "a = " + "[" * 40 + "]" * 40)]:
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match="nested") as err:
            read_config_file(path)
        assert len(str(err.value)) <= MAX_CHARS, depth


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("!!float k", "the value 'k' cannot be read as float"),
        ("!!float ''", "cannot be read as float"),
        ("!!timestamp 12:30:00x", "cannot be read as timestamp"),
        ("!!int x", "cannot be read as int"),
        ("1" * 5000, "an integer of 5,000 digits"),
    ],
)
def test_values_that_do_not_fit_their_yaml_tag_are_yaml_errors(tmp_path, value, needle):
    """PyYAML lets them escape as ValueError, IndexError or AttributeError tracebacks."""
    path = tmp_path / "exp.yaml"
    path.write_text(f"run:\n  seed: {value}\n")
    with pytest.raises(ConfigError, match="line 2.*invalid YAML") as err:
        read_config_file(path)
    assert needle in str(err.value) and len(str(err.value)) <= MAX_CHARS
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        apply_overrides({}, [f"run.seed={value}"])
    assert needle in str(err.value) and len(str(err.value)) <= MAX_CHARS


def test_a_toml_integer_too_long_to_read_is_refused(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[run]\nseed = " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match="invalid TOML: Exceeds the limit") as err:
        read_config_file(path)
    assert len(str(err.value)) <= MAX_CHARS


def test_a_config_above_the_size_limit_is_refused_unread(tmp_path, workdir, capsys):
    """A 50 MB file (sparse: no disk used) is refused at once with the limit in the message."""
    path = tmp_path / "big.yaml"
    with open(path, "wb") as file:
        file.write(b"run: {seed: 1}\n")
        file.truncate(50 * 2**20)
    start = time.monotonic()
    code, err = invoke("validate", str(path), [], capsys)
    assert time.monotonic() - start < 2.0
    assert_refused(code, err, f"{50 * 2**20:,} bytes", f"limit for a config is {MAX_CONFIG_BYTES:,} bytes")
    path.write_bytes(b"#" * MAX_CONFIG_BYTES + b"\n")  # one byte above the limit
    with pytest.raises(ConfigError, match=f"{MAX_CONFIG_BYTES + 1:,} bytes"):
        read_config_file(path)


def test_a_folder_or_a_fifo_named_like_a_config_is_refused_without_blocking(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    os.mkfifo(tmp_path / "pipe.yaml")  # no writer: opening it would block for ever
    for name in ("dir.yaml", "pipe.yaml"):
        with pytest.raises(ConfigError, match="is not a regular file"):
            read_config_file(tmp_path / name)


# -- message length --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["huge key", "huge value", "many errors", "huge override", "huge plugin name", "huge config name"]
)
def test_messages_stay_short_whatever_the_input(workdir, capsys, registry, case):
    """The probes that printed 100 MB and 340 KB messages: every message is capped, values abbreviated."""
    big = "x" * 200_000
    overrides: list[str] = []
    path = workdir / "exp.yaml"
    config = str(path)
    raw = read_config_file(resolve_config_path("tiny"))
    if case == "huge key":
        raw["pretrain"][big] = 1
    elif case == "huge value":
        raw["run"]["seed"] = big
    elif case == "many errors":
        raw["pretrain"].update({f"unknown{i}": i for i in range(1000)})
    elif case == "huge override":
        overrides = [f"run.seed{big}"]
    elif case == "huge plugin name":
        overrides = [f"data.name={big}"]
    else:
        config = big
    path.write_text(yaml.safe_dump(raw))
    code, err = invoke("validate", config, overrides, capsys)
    assert code == 2 and "Traceback" not in err and "x" * 200 not in err, err[:2000]
    if case == "many errors":  # the first few, then a count; under the command line's own cap
        assert len(err.splitlines()) == MAX_ERRORS + 2 and f"... and {1000 - MAX_ERRORS} more" in err, err
        assert len(err) <= cli.MAX_MESSAGE and "more characters" not in err, err
    else:
        assert len(err) <= MAX_CHARS, err


def test_the_command_line_caps_any_message(capsys):
    def fail() -> int:
        raise ConfigError("y" * 10**7)

    assert cli.report_errors(fail) == 2
    err = capsys.readouterr().err
    assert len(err) < cli.MAX_MESSAGE + 100 and err.rstrip().endswith("more characters)")


# -- where a message points -----------------------------------------------------------------


def test_a_model_validator_error_points_at_the_field_it_names(workdir, capsys, registry):
    code, err = invoke("validate", "tiny", ["regions={name: axial, fractions: [0.5, 0.6]}"], capsys)
    assert_refused(code, err, "regions.fractions = [0.5, 0.6]: fractions has 2 entries for 3 names")
    assert "Value error" not in err


def test_a_model_validator_error_points_at_the_dotted_path_it_starts_with(workdir, capsys, registry):
    """A run-level check names a field several sections down: the line points there, saying it once."""
    flow = "{name: flow-matching, widths: [8, 16], blocks: [1, 1], embed_dim: 16, steps: 2}"
    wrong = "finetune.sampling_time={positional-segmentor: {mechanisms: [diffusion]}}"
    code, err = invoke("validate", "tiny", [f"compare_mechanisms={{fm: {flow}}}", wrong], capsys)
    assert_refused(
        code, err, "finetune.sampling_time.positional-segmentor.mechanisms = ['diffusion']: 'diffusion' is not an image"
    )
    assert err.count("sampling_time") == 2, err  # the line's head and the --set it came from


def test_a_field_validator_error_has_no_pydantic_prefix(workdir, capsys, registry):
    code, err = invoke("validate", "tiny", ["data.spacing_mm=0.3"], capsys)
    assert_refused(code, err, "data.spacing_mm = 0.3: spacing_mm=0.3 must divide")
    assert "Value error" not in err


def test_the_source_is_the_file_the_override_or_both(workdir, capsys, registry):
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_with("pretrain.lr=-1")))
    code, err = invoke("validate", str(path), ["finetune.temperature=0"], capsys)
    assert_refused(code, err, f"invalid config {path} and --set (2 errors)")
    assert "pretrain.lr = -1: Input should be greater than 0\n" in err
    assert "finetune.temperature = 0: Input should be greater than 0 (from --set finetune.temperature=0)" in err


# -- an override that switches a component ---------------------------------------------------


@pytest.mark.parametrize(
    "order", list(itertools.permutations(["data.name=folder", "data.path=scans", "data.spacing_mm=0.5"]))
)
def test_switching_data_to_folder_drops_the_phantoms_fields(workdir, registry, order):
    config = load_config("tiny", list(order), registry)
    assert config.data.model_dump(include={"name", "path", "spacing_mm"}) == {
        "name": "folder",
        "path": Path("scans"),
        "spacing_mm": 0.5,
    }


def test_switching_without_the_new_components_fields_names_the_override(workdir, capsys, registry):
    code, err = invoke("validate", "tiny", ["data.name=folder"], capsys)
    assert_refused(code, err, "data.path: missing", "(from --set data.name=folder)")
    assert "n_train" not in err and "tiny.yaml" not in err


def test_an_override_that_keeps_the_name_keeps_the_files_fields(workdir, registry):
    assert load_config("tiny", ["data.name=phantom"], registry).data.n_train == 32


def test_a_whole_section_can_be_replaced_in_one_override(workdir, registry):
    config = load_config("tiny", ["data={name: folder, path: scans, spacing_mm: 0.5}"], registry)
    assert config.data.name == "folder" and config.data.path == Path("scans")


def test_switching_a_strategy_term_and_a_metric_starts_them_from_defaults(workdir, registry, tmp_path):
    raw = read_config_file(resolve_config_path("tiny"))
    raw["finetune"]["strategies"]["positional-segmentor"] = [
        {"name": "positional-segmentor", "gradient_temperature": 2}
    ]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    overrides = ["finetune.strategies.positional-segmentor.0.name=regressor", "evaluate.metrics.2.name=gone"]
    with pytest.raises(ConfigError, match="evaluate.metrics.2.name = 'gone'") as err:
        load_config(path, overrides, registry)
    assert "gradient_temperature" not in str(err.value)  # the term was switched, the metric's name is unknown
    config = load_config(path, overrides[:1], registry)
    assert config.finetune.strategies["positional-segmentor"][0].name == "regressor"


# -- what the field types cannot check alone ------------------------------------------------

LOOSE_PLUGIN = """
from typing import Any, Literal

from pydantic import ConfigDict

import causalimg
from causalimg.strict import StrictModel
from causalimg.plugins import specs


class LooseData(StrictModel):  # inf and NaN allowed again, and an untyped field
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=True)
    name: Literal["loose-data"] = "loose-data"
    scale: float = 1.0
    extra: Any = None


@causalimg.hookimpl
def causalimg_datasets():
    return [specs.DatasetSpec("loose-data", LooseData, LooseData, "Loose data set")]
"""


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"scale": float("inf")}, "data.scale = inf: Input should be a finite number"),
        ({"extra": [1.0, float("nan")]}, "data.extra.1 = nan: Input should be a finite number"),
        ({"extra": {"n": 2**64}}, f"data.extra.n = {2**64}: Input should fit in a 64-bit integer"),
    ],
)
def test_numbers_no_tensor_holds_are_refused_in_any_plugins_config(tmp_path, monkeypatch, value, needle):
    (tmp_path / "loose.py").write_text(LOOSE_PLUGIN)
    (tmp_path / "toy.py").write_text(TOY_PLUGIN)
    monkeypatch.setenv("CAUSALIMG_PLUGINS_ONLY", "loose,toy")
    registry = load_registry([tmp_path])
    raw = {**TOY_CONFIG, "data": {"name": "loose-data", **value}}
    with pytest.raises(ConfigError) as err:
        validate_config(raw, registry, "exp.yaml")
    assert needle in str(err.value)


def config_models(registry: Registry) -> list[type[BaseModel]]:
    """Every config model of the run config and of the registered plugins, nested ones included."""
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if is_model and annotation.__qualname__ not in found:
            found[annotation.__qualname__] = annotation
            for field in annotation.model_fields.values():
                visit(field.annotation)
        for arg in getattr(annotation, "__args__", ()) or getattr(annotation, "__metadata__", ()):
            visit(arg)
        if hasattr(annotation, "__origin__"):
            visit(annotation.__origin__)

    for model in (build_run_config_model(registry), SegmentorConfig, RegressorConfig):
        visit(model)
    for spec in registry:
        visit(spec.config)
    return list(found.values())


def with_number(schema: dict[str, Any], defs: dict[str, Any], number: float) -> tuple[Any, bool]:
    """A value of a field's schema with ``number`` at every float position (and whether it has one)."""
    if "$ref" in schema:
        return None, False  # a nested model: checked as a model of its own
    if schema.get("type") == "number":
        return number, True
    for option in schema.get("anyOf", []):
        value, has = with_number(option, defs, number)
        if has:
            return value, True
    if schema.get("type") == "array":
        items = schema.get("prefixItems") or [schema.get("items", {})]
        values = [with_number(item, defs, number) for item in items]
        return [v for v, _ in values], any(has for _, has in values)
    return None, False


FILLERS = {"string": "x", "integer": 1, "number": 0.5}


def number_fields(model: type[BaseModel]) -> list[tuple[str, dict[str, Any], Any]]:
    schema = model.model_json_schema()
    props, defs = schema.get("properties", {}), schema.get("$defs", {})
    required = {k: FILLERS.get(props[k].get("type"), "x") for k in schema.get("required", []) if k != "name"}
    return [(key, required, prop) for key, prop in props.items() if with_number(prop, defs, 1.0)[1]]


def test_every_float_of_every_built_in_config_model_refuses_inf_and_nan(builtin):
    """Every config model derives from StrictModel, and each float position (in tuples, optional
    fields, nested tuples) refuses inf, -inf and NaN with pydantic's finite-number error."""
    models = config_models(builtin)
    assert len(models) > 20  # the run config's sections and every built-in plugin's config
    checked = 0
    for model in models:
        assert issubclass(model, StrictModel) and model.model_config.get("allow_inf_nan") is False, model
        for key, required, prop in number_fields(model):
            for number in (float("inf"), float("-inf"), float("nan")):
                value, _ = with_number(prop, {}, number)
                with pytest.raises(ValidationError) as err:
                    model.model_validate({**required, key: value})
                assert "finite_number" in {e["type"] for e in err.value.errors()}, (model, key, number)
                checked += 1
    assert checked >= 3 * 26  # 26 float fields in 29 models when this was written


# Lists that may be empty, and why; every other list or map of a built-in config model may not.
MAY_BE_EMPTY = {
    ("PluginsSection", "dirs"): "no extra plugin folders",
    ("SplineFlowConfig", "hidden"): "no hidden layer: a linear hyper-network",
    ("EvaluateSection", "metrics"): "an evaluation without metrics",
    ("ReportSection", "ordering"): "no expected ordering to count",
    ("ReportSection", "tables"): "a report without a Table 1",
    ("RunConfig", "compare_mechanisms"): "one image mechanism, compared with none",
    ("FinetuneSection", "sampling_time"): "every strategy fine-tunes",
    ("FinetuneSection", "per_mechanism"): "every image mechanism fine-tuned with the shared settings",
}


def test_architecture_tuples_and_maps_of_built_in_configs_are_not_empty(builtin):
    refused, allowed = [], set()
    for model in config_models(builtin):
        schema = model.model_json_schema()
        required = {k: FILLERS.get(schema["properties"][k].get("type"), "x") for k in schema.get("required", [])}
        required.pop("name", None)
        for key, prop in schema.get("properties", {}).items():
            kinds = {o.get("type") for o in prop.get("anyOf", [prop]) if "prefixItems" not in o}
            if not kinds & {"array", "object"} or "$ref" in prop:
                continue
            if (model.__name__, key) in MAY_BE_EMPTY:
                allowed.add((model.__name__, key))
                continue
            with pytest.raises(ValidationError):
                model.model_validate({**required, key: [] if "array" in kinds else {}})
            refused.append(f"{model.__name__}.{key}")
    assert allowed == set(MAY_BE_EMPTY)  # the exceptions still exist
    # segmentor widths (run config and U-Net), four HVAE tuples, label_map, cycles, strategies, region names ...
    assert len(refused) >= 13, refused
