"""Contract checks for plugin authors: call these from your tests on your partitioner or data source.

Each check raises ``AssertionError`` with a message naming what broke; it returns nothing on success.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from causalimg.core.data import DataSource
from causalimg.core.regions import Partitioner, variable_areas
from causalimg.core.variables import NUM_CLASSES, variable_names


def check_partitioner(
    partitioner: Partitioner,
    height: int = 32,
    width: int = 192,
    spacing_mm: float = 0.5,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Masks are (K, H, W) float32 CPU tensors in {0, 1}, disjoint, covering, deterministic; names unique."""
    names = tuple(partitioner.region_names)
    assert names and len(set(names)) == len(names), f"region_names must be unique and non-empty: {names}"
    masks = partitioner.masks(height, width, spacing_mm, metadata)
    assert isinstance(masks, torch.Tensor), f"masks must be a torch.Tensor, got {type(masks).__name__}"
    assert masks.shape == (len(names), height, width), f"masks shape {tuple(masks.shape)} != {(len(names), height, width)}"
    assert masks.dtype == torch.float32, f"masks dtype {masks.dtype} != torch.float32"
    assert masks.device.type == "cpu", f"masks built from sizes must be on the CPU, got {masks.device}"
    assert bool(((masks == 0) | (masks == 1)).all()), "masks must hold only 0 and 1"
    cover = masks.sum(0)
    assert bool((cover <= 1).all()), "regions overlap: some pixel is in two regions"
    assert bool((cover >= 1).all()), "regions do not cover the image: some pixel is in no region"
    again = partitioner.masks(height, width, spacing_mm, metadata)
    assert torch.equal(masks, again), "masks differ between two identical calls"


def check_data_source(source: DataSource, split: str = "train", n: int = 4) -> None:
    """Items of ``source.split(split)`` have the documented keys, shapes, dtypes and ranges, and their
    area parents equal ``variable_areas(masks, regions)``."""
    assert isinstance(source, DataSource), f"{type(source).__name__} does not implement DataSource"
    h, w = source.image_shape
    k = len(source.region_names)
    areas = variable_names(tuple(source.region_names))
    missing = [v for v in areas if v not in source.variables]
    assert not missing, f"variables {source.variables} lack the area variables {missing}"
    assert set(source.graph) == set(source.variables), "graph must list every variable (roots map to ())"
    for child, parents in source.graph.items():
        unknown = [p for p in parents if p not in source.variables]
        assert not unknown, f"graph parents {unknown} of {child!r} are not variables"
    data = source.split(split)  # type: ignore[arg-type]
    assert len(data) > 0, f"split {split!r} is empty"
    for i in range(min(n, len(data))):
        item = data[i]
        for key in ("image", "masks", "labels", "parents", "regions", "index"):
            assert key in item, f"item {i} lacks {key!r}"
        img, masks, labels, parents, regions = (item[key] for key in ("image", "masks", "labels", "parents", "regions"))
        assert img.shape == (1, h, w) and img.dtype == torch.float32, f"image {tuple(img.shape)} {img.dtype}"
        assert bool(torch.isfinite(img).all()) and img.min() >= -1 and img.max() <= 1, "image must be finite, in [-1, 1]"
        assert masks.shape == (NUM_CLASSES, h, w) and masks.dtype == torch.float32, f"masks {tuple(masks.shape)}"
        assert bool((masks >= 0).all()) and torch.allclose(masks.sum(0), torch.ones(h, w), atol=1e-5), (
            "masks must be fractions summing to 1 per pixel"
        )
        assert labels.shape == (h, w) and labels.dtype == torch.int64, f"labels {tuple(labels.shape)} {labels.dtype}"
        assert bool((labels >= 0).all() and (labels < NUM_CLASSES).all()), "labels outside 0..NUM_CLASSES-1"
        assert parents.shape == (len(source.variables),) and parents.dtype == torch.float32, (
            f"parents {tuple(parents.shape)} {parents.dtype}"
        )
        assert regions.shape == (k, h, w), f"regions {tuple(regions.shape)} != {(k, h, w)}"
        assert int(item["index"]) == i, f"item {i} has index {int(item['index'])}"
        measured = variable_areas(masks[None], regions[None], source.spacing_mm**2)[0]
        given = parents[[source.variables.index(v) for v in areas]]
        assert torch.allclose(given, measured, rtol=1e-5, atol=1e-4), (
            f"item {i}: parents {given.tolist()} != variable_areas(masks, regions) {measured.tolist()}"
        )
