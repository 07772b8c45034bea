"""The out-of-tree example plugin, reached through its installed entry point (CI installs it)."""

from __future__ import annotations

import importlib.metadata

import pytest
from pydantic import ValidationError

from causalimg.errors import ConfigError
from causalimg.plugins.manager import ENV_ONLY, Registry, get_plugin_manager
from causalimg.testing import check_partitioner


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv(ENV_ONLY, "unequal-axial")
    return Registry.from_manager(get_plugin_manager())


def test_registered_through_the_entry_point(registry):
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="causalimg") if ep.name == "unequal-axial"]
    assert entry_point.dist.name == "causalimg-unequal-axial"
    origin = registry.origin("partitioner", "unequal-axial")
    assert (origin.distribution, origin.version, origin.source) == ("causalimg-unequal-axial", "0.1.0", "entry-point")


def test_masks_partition_the_image_by_length_in_mm(registry):
    spec = registry.get("partitioner", "unequal-axial")
    partitioner = spec.factory(spec.config())
    check_partitioner(partitioner, height=32, width=192, spacing_mm=0.5)  # shape, dtype, disjoint, ...
    masks = partitioner.masks(32, 192, 0.5)  # a 96 mm vessel segment
    assert masks[:, 0].sum(-1).tolist() == [77.0, 67.0, 48.0]  # 38.4 / 33.6 / 24 mm at 0.5 mm per pixel
    assert partitioner.region_names == ("proximal", "mid", "distal")


def test_configurable_regions_and_clear_errors(registry):
    spec = registry.get("partitioner", "unequal-axial")
    two = spec.factory(spec.config(region_names=("near", "far"), lengths_mm=(10.0,)))
    assert two.masks(4, 40, 0.5)[0, 0].sum() == 20  # 10 mm of 0.5 mm pixels
    with pytest.raises(ConfigError, match=r"region 'far' would be empty"):
        two.masks(4, 16, 0.5)  # an 8 mm image
    with pytest.raises(ValidationError, match="lengths_mm needs 1 lengths"):
        spec.config(region_names=("near", "far"), lengths_mm=(10.0, 5.0))
