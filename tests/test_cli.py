"""The command lines: exit statuses, messages without tracebacks, the run's plan and resolved config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TOY_CONFIG

from causalimg import cli, run
from causalimg.config.loader import resolve_config_path
from causalimg.plugins.manager import ENV_ONLY


@pytest.fixture
def tiny_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped tiny config with a relative run folder and a guided strategy, as a file."""
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(resolve_config_path("tiny").read_text())
    raw["run"]["dir"] = "runs/exp"
    raw["finetune"]["strategies"] = {"none": [], "guided": [{"name": "regressor"}]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def toy_config(toy_plugin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file that loads the toy plugin (alone) from its folder: valid, though its toys build nothing."""
    monkeypatch.setenv(ENV_ONLY, "toy")
    monkeypatch.chdir(tmp_path)
    raw = {
        **TOY_CONFIG,
        "plugins": {"dirs": [str(toy_plugin_dir)]},
        "run": {"dir": "runs/exp"},
        "finetune": {"strategies": {"none": [], "guided": [{"name": "toy-guide"}]}},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_plugins_lists_the_entry_point_plugin_with_its_distribution(capsys):
    assert cli.main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("unequal-axial"))
    assert line.split()[:4] == ["unequal-axial", "partitioner", "causalimg-unequal-axial", "0.1.0"]


def test_plugins_json_with_a_plugin_dir(toy_plugin_dir, capsys):
    assert cli.main(["plugins", "--json", "--plugins-dir", str(toy_plugin_dir)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["toy-flow"]["kind"] == "attribute_mechanism" and rows["toy-flow"]["plugin"] == "toy"
    assert rows["toy-flow"]["distribution"] == str(toy_plugin_dir.resolve() / "toy.py")


def test_validate_ok_and_show(tiny_config, capsys):
    assert cli.main(["validate", str(tiny_config), "--show", "--set", "run.seed=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["run"]["seed"] == 4 and shown["regions"] == {"name": "axial-thirds"}


def test_validate_error_exits_2_with_message(toy_config, capsys):
    assert cli.main(["validate", str(toy_config), "--set", "regions.name=toy-halfs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("causalimg: error: invalid config") and "did you mean 'toy-halves'" in err


def test_schema_is_json_with_every_section(capsys):
    assert cli.main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert list(schema["properties"]) == [
        "run",
        "plugins",
        "data",
        "regions",
        "flows",
        "image_mechanism",
        "compare_mechanisms",
        "flows_train",
        "pretrain",
        "predictors",
        "finetune",
        "evaluate",
        "report",
        "tracking",
    ]


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["validate"], ["schema", "--bogus"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2


def test_console_errors_have_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not\n- a mapping\n")
    result = subprocess.run(
        [sys.executable, "-m", "causalimg", "validate", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and str(bad) in result.stderr


def test_run_writes_resolved_config_and_prints_plan(tiny_config, tmp_path, capsys):
    assert run.main(["--dry-run", "--config", str(tiny_config), "--set", "pretrain.steps=3"]) == 0
    out = capsys.readouterr().out
    steps = [line.split(". ", 1)[1] for line in out.splitlines()[1:]]
    assert steps == [
        "data",
        "flows",
        "predictors",
        "pretrain",
        "finetune[none]",
        "finetune[guided]",
        "evaluate",
        "report",
    ]
    saved = yaml.safe_load((tmp_path / "runs/exp/config.yaml").read_text())
    assert saved["pretrain"]["steps"] == 3 and saved["run"]["dir"] == str(tmp_path.resolve() / "runs/exp")
    assert sorted(p.name for p in (tmp_path / "runs/exp").iterdir()) == ["config.yaml", "run.lock"]  # no temporary left


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(["--only", "pretrain"], ("pretrain",)), (["--from", "evaluate"], ("evaluate", "report")), ([], run.STAGES)],
)
def test_stage_selection(flags, expected):
    args = run.build_parser().parse_args(["--config", "x", *flags])
    assert run.select_stages(args.only, args.start) == expected


def test_only_and_from_together_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_:
        run.main(["--config", "x", "--only", "data", "--from", "flows"])
    assert exit_.value.code == 2


def test_resume_needs_the_same_saved_config(tiny_config, capsys):
    assert run.main(["--config", str(tiny_config), "--resume"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert run.main(["--dry-run", "--config", str(tiny_config)]) == 0
    assert run.main(["--dry-run", "--config", str(tiny_config), "--resume"]) == 0
    assert run.main(["--config", str(tiny_config), "--resume", "--set", "run.seed=9"]) == 2
    assert "config differs" in capsys.readouterr().err


def test_run_bad_config_exits_2(tiny_config, capsys):
    assert run.main(["--config", str(tiny_config), "--set", "pretrain.lr=-1"]) == 2
    assert "pretrain.lr = -1: Input should be greater than 0" in capsys.readouterr().err
