"""The docs stay true: every hook documented with its exact signature, generated files current."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from causalimg import cli
from causalimg.plugins import hookspecs
from causalimg.plugins.manager import registration_hooks

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = (ROOT / "docs" / "plugins.md").read_text()


def hook_names() -> list[str]:
    return [name for name in vars(hookspecs) if name.startswith("causalimg_")]


def test_every_hookspec_is_a_registration_hook():
    assert sorted(hook_names()) == sorted(registration_hooks())


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented_with_its_exact_signature(name):
    source = inspect.getsource(getattr(hookspecs, name))
    signature = next(line for line in source.splitlines() if line.startswith("def ")).rstrip(":")
    assert f"### `{name}`" in PLUGINS_DOC
    assert f"```python\n{signature}\n```" in PLUGINS_DOC


def test_tutorial_code_is_the_tested_plugin_file():
    marker = "<!-- file: plugins/causalimg-unequal-axial/causalimg_unequal_axial.py -->\n```python\n"
    shown = PLUGINS_DOC.split(marker, 1)[1].split("```\n", 1)[0]
    assert shown == (ROOT / "plugins" / "causalimg-unequal-axial" / "causalimg_unequal_axial.py").read_text()


def test_config_reference_is_current(capsys):
    assert cli.main(["schema", "--markdown", "--builtin-only"]) == 0
    generated = capsys.readouterr().out
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == generated, (
        "docs/config.md is stale: run `causalimg schema --markdown --builtin-only > docs/config.md`"
    )


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (ROOT / target).exists(), target


def readme_command(section: str) -> str:
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"## {section}\n", 1)[1]
    return body.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()


def test_ci_runs_exactly_the_readme_commands():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    test = readme_command("Test").splitlines()
    assert ci_lines[-1 - len(test) :] == [readme_command("Set up"), *test]
    assert "set -euo pipefail" in ci_lines
