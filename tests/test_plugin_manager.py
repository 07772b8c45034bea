"""The plugin manager and registry: loading order, errors that name the plugin, env filters."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import causalimg
from causalimg.errors import ConfigError, PluginError
from causalimg.plugins import manager
from causalimg.plugins.manager import (
    ENV_BLOCK,
    ENV_ONLY,
    ENV_TRACE,
    CausalImgPluginManager,
    PluginOrigin,
    Registry,
    get_plugin_manager,
    registration_hooks,
)
from causalimg.plugins.specs import SPEC_KINDS, MetricSpec, PartitionerSpec
from causalimg.strict import StrictModel


def partitioner_config(name: str) -> type[StrictModel]:
    return type(  # a config model whose ``name`` is Literal[name]
        "Config",
        (StrictModel,),
        {"__annotations__": {"name": Literal[name]}, "name": name},  # type: ignore[valid-type]
    )


class Partitioners:
    """An inline plugin providing partitioners with the given names."""

    def __init__(self, *names: str):
        self.names = names

    @causalimg.hookimpl
    def causalimg_region_partitioners(self) -> list[PartitionerSpec]:
        return [PartitionerSpec(n, partitioner_config(n), object, f"partitioner {n}") for n in self.names]


def fresh(*plugins: tuple[str, object]) -> CausalImgPluginManager:
    pm = CausalImgPluginManager()
    for name, plugin in plugins:
        pm.register_plugin(plugin, PluginOrigin(name, f"dist-{name}", "1.2", "runtime"))
    return pm


def test_every_record_kind_has_exactly_one_registration_hook():
    hooks = registration_hooks()
    assert sorted(spec.kind for spec in hooks.values()) == sorted(spec.kind for spec in SPEC_KINDS)
    assert all(name.startswith("causalimg_") for name in hooks)


def test_inline_plugin_components_sorted_by_name_with_their_provider():
    registry = Registry.from_manager(fresh(("mine", Partitioners("zeta", "alpha", "mid"))))
    assert registry.names("partitioner") == ("alpha", "mid", "zeta")
    assert registry.get("partitioner", "mid").provider == "plugin 'mine' (dist-mine 1.2)"
    assert registry.origin("partitioner", "zeta") == PluginOrigin("mine", "dist-mine", "1.2", "runtime")
    assert registry.names("metric") == ()


def test_duplicate_component_names_both_providers():
    pm = fresh(("first", Partitioners("grid")), ("second", Partitioners("grid")))
    with pytest.raises(PluginError) as err:
        Registry.from_manager(pm)
    message = str(err.value)
    assert "'grid'" in message and "dist-first 1.2" in message and "dist-second 1.2" in message


def test_two_plugins_with_one_name_are_an_error():
    with pytest.raises(PluginError, match="two plugins are named 'same'"):
        fresh(("same", Partitioners("a")), ("same", Partitioners("b")))


def test_lookup_suggests_close_names_and_lists_valid_ones():
    registry = Registry.from_manager(fresh(("mine", Partitioners("axial-thirds", "grid"))))
    with pytest.raises(
        ConfigError, match=r"'axial-thrids' \(did you mean 'axial-thirds'\?\); valid names: axial-thirds, grid"
    ):
        registry.get("partitioner", "axial-thrids")
    with pytest.raises(ConfigError, match="no metric plugins are registered"):
        registry.get("metric", "fid")


def write_plugin(folder: Path, stem: str, source: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(source)
    return path


def test_misspelled_hook_is_an_error_naming_the_plugin_file(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ONLY, "typo")
    write_plugin(
        tmp_path, "typo", "import causalimg\n@causalimg.hookimpl\ndef causalimg_region_partitoners():\n    return []\n"
    )
    with pytest.raises(PluginError, match=r"plugin 'typo' \(.*typo\.py\).*causalimg_region_partitoners"):
        get_plugin_manager([tmp_path])


def test_one_file_plugin_that_fails_to_import_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ONLY, "broken")
    write_plugin(tmp_path, "broken", "import no_such_module_for_causalimg\n")
    with pytest.raises(PluginError, match=r"broken\.py.*failed to import.*no_such_module_for_causalimg"):
        get_plugin_manager([tmp_path])


def test_missing_plugin_directory_is_an_error(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        get_plugin_manager([tmp_path / "nowhere"], builtin_only=False)


def test_builtin_that_fails_to_import_is_named(monkeypatch):
    monkeypatch.setattr(manager, "BUILTIN_PLUGINS", ("causalimg.no_such_builtin",))
    with pytest.raises(PluginError, match=r"built-in plugin 'no_such_builtin'.*causalimg\.no_such_builtin"):
        get_plugin_manager(builtin_only=True)


def test_entry_point_that_fails_to_load_names_it(monkeypatch):
    broken = importlib.metadata.EntryPoint(name="broken-ep", value="no_such_module_for_causalimg", group="causalimg")
    monkeypatch.setattr(manager, "BUILTIN_PLUGINS", ())
    monkeypatch.setattr(manager.importlib.metadata, "entry_points", lambda group: [broken])
    with pytest.raises(PluginError, match=r"entry-point plugin 'broken-ep'.*no_such_module_for_causalimg"):
        get_plugin_manager()


def test_only_loads_just_the_named_plugins(toy_plugin_dir, monkeypatch):
    monkeypatch.setenv(ENV_ONLY, "toy")
    pm = get_plugin_manager([toy_plugin_dir])
    assert [pm.get_name(p) for p in pm.get_plugins()] == ["toy"]


def test_block_skips_the_named_plugin(toy_plugin_dir, monkeypatch):
    monkeypatch.setenv(ENV_BLOCK, "toy")
    registry = Registry.from_manager(get_plugin_manager([toy_plugin_dir]))
    assert "toy-data" not in registry.names("dataset")


def test_unknown_name_in_env_filter_is_an_error(toy_plugin_dir, monkeypatch):
    monkeypatch.setenv(ENV_ONLY, "tyo")
    with pytest.raises(PluginError, match=r"CAUSALIMG_PLUGINS_ONLY names 'tyo'.*did you mean 'toy'"):
        get_plugin_manager([toy_plugin_dir])


def test_trace_env_prints_hook_calls(toy_plugin_dir, monkeypatch, capsys):
    monkeypatch.setenv(ENV_ONLY, "toy")
    monkeypatch.setenv(ENV_TRACE, "1")
    Registry.from_manager(get_plugin_manager([toy_plugin_dir]))
    assert "causalimg_datasets" in capsys.readouterr().err


class Raising:
    @causalimg.hookimpl
    def causalimg_metrics(self):
        raise RuntimeError("boom")


class WrongRecord:
    @causalimg.hookimpl
    def causalimg_metrics(self):
        return [PartitionerSpec("grid", partitioner_config("grid"), object, "not a metric")]


class MismatchedLiteral:
    @causalimg.hookimpl
    def causalimg_metrics(self):
        return [MetricSpec("fid", partitioner_config("kid"), object, "name and Literal differ")]


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        (Raising(), r"plugin 'bad' \(dist-bad 1.2\) failed in hook causalimg_metrics: RuntimeError: boom"),
        (WrongRecord(), r"plugin 'bad' .*expected MetricSpec records"),
        (MismatchedLiteral(), r"plugin 'bad' .*Literal\['fid'\]"),
    ],
)
def test_bad_registration_is_reported_by_plugin_name(plugin, expected):
    pm = fresh(("good", Partitioners("grid")), ("bad", plugin))
    with pytest.raises(PluginError, match=expected):
        Registry.from_manager(pm)


@settings(max_examples=25, deadline=None)
@given(st.permutations(["c", "a", "d", "b"]))
def test_registry_order_does_not_depend_on_registration_order(order):
    pm = fresh(*[(f"p{name}", Partitioners(f"part-{name}")) for name in order])
    assert Registry.from_manager(pm).names("partitioner") == ("part-a", "part-b", "part-c", "part-d")
