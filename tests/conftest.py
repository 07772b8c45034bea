"""Shared fixtures: a clean plugin environment and a registry of small toy components."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from causalimg.plugins.manager import ENV_BLOCK, ENV_ONLY, ENV_TRACE, Registry, get_plugin_manager

# A one-file plugin with one component of every kind; written to a folder by ``toy_plugin_dir``.
TOY_PLUGIN = """
from typing import Literal

from pydantic import PositiveInt

import causalimg
from causalimg.strict import StrictModel
from causalimg.plugins import specs


class ToyData(StrictModel):
    name: Literal["toy-data"] = "toy-data"
    size: PositiveInt = 8


class ToyHalves(StrictModel):
    name: Literal["toy-halves"] = "toy-halves"


class ToyFlow(StrictModel):
    name: Literal["toy-flow"] = "toy-flow"
    layers: PositiveInt = 2


class ToyVAE(StrictModel):
    name: Literal["toy-vae"] = "toy-vae"
    widths: tuple[PositiveInt, ...] = (8, 16)


class ToyGuide(StrictModel):
    name: Literal["toy-guide"] = "toy-guide"
    weight: float = 1.0


class ToyMetric(StrictModel):
    name: Literal["toy-metric"] = "toy-metric"


@causalimg.hookimpl
def causalimg_datasets():
    return [specs.DatasetSpec("toy-data", ToyData, ToyData, "Toy data set")]


@causalimg.hookimpl
def causalimg_region_partitioners():
    return [specs.PartitionerSpec("toy-halves", ToyHalves, ToyHalves, "Toy halves")]


@causalimg.hookimpl
def causalimg_attribute_mechanisms():
    return [specs.AttributeMechanismSpec("toy-flow", ToyFlow, ToyFlow, "Toy flow")]


@causalimg.hookimpl
def causalimg_image_mechanisms():
    return [specs.ImageMechanismSpec("toy-vae", ToyVAE, ToyVAE, "Toy image mechanism")]


@causalimg.hookimpl
def causalimg_guidance_strategies():
    return [specs.GuidanceSpec("toy-guide", ToyGuide, ToyGuide, "Toy guidance")]


@causalimg.hookimpl
def causalimg_metrics():
    return [specs.MetricSpec("toy-metric", ToyMetric, ToyMetric, "Toy metric")]
"""

# The smallest config that the toy registry validates.
TOY_CONFIG = {"data": "toy-data", "regions": "toy-halves", "flows": "toy-flow", "image_mechanism": "toy-vae"}


@pytest.fixture(autouse=True)
def clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the caller's plugin selection or hook tracing."""
    for variable in (ENV_ONLY, ENV_BLOCK, ENV_TRACE):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def toy_plugin_dir(tmp_path: Path) -> Path:
    """A plugin folder holding ``toy.py`` (plugin name ``toy``)."""
    folder = tmp_path / "toy_plugins"
    folder.mkdir()
    (folder / "toy.py").write_text(TOY_PLUGIN)
    return folder


@pytest.fixture
def toy_registry(toy_plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A fresh registry with the toy plugin alone (loaded through the one-file plugin path)."""
    monkeypatch.setenv(ENV_ONLY, "toy")
    registry = Registry.from_manager(get_plugin_manager([toy_plugin_dir]))
    monkeypatch.delenv(ENV_ONLY)
    return registry


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one thread, so a busy test machine cannot stall OpenMP workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
