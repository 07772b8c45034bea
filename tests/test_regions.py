"""Region partitioners and the one regional measurement."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from causalimg.core.regions import batch_region_masks, regional_areas, variable_areas
from causalimg.errors import DataError
from causalimg.plugins.manager import load_registry
from causalimg.regions.axial import AxialConfig, AxialPartitioner
from causalimg.regions.grid import GridPartitioner
from causalimg.regions.landmarks import LandmarkPartitioner
from causalimg.testing import check_partitioner

REGISTRY = load_registry()
PARTITIONERS = REGISTRY.names("partitioner")


def landmarks(width: int, spacing: float) -> dict[str, list[float]]:
    """Per-image metadata for ``landmarks``; partitioners that need none ignore it."""
    return {"boundaries_mm": [0.3 * width * spacing, 0.65 * width * spacing]}


def build(name: str):
    spec = REGISTRY.get("partitioner", name)
    return spec.factory(spec.config())


def test_builtin_partitioners_are_registered():
    assert {"axial-thirds", "axial", "landmarks", "grid"} <= set(PARTITIONERS)


@pytest.mark.parametrize("name", PARTITIONERS)
@pytest.mark.parametrize(("height", "width", "spacing"), [(32, 192, 0.5), (64, 384, 0.25), (7, 160, 0.6)])
def test_every_registered_partitioner_meets_the_contract(name, height, width, spacing):
    check_partitioner(build(name), height, width, spacing, metadata=landmarks(width, spacing))


def test_axial_thirds_split_at_equal_lengths():
    masks = build("axial-thirds").masks(32, 192, 0.5)
    assert build("axial-thirds").region_names == ("proximal", "mid", "distal")
    cols = masks[:, 0].argmax(0)  # (W,) region of each column
    assert cols[:64].eq(0).all() and cols[64:128].eq(1).all() and cols[128:].eq(2).all()


def test_axial_by_millimetres_and_fractions():
    by_mm = AxialPartitioner(("a", "b"), boundaries_mm=(24.0,)).masks(4, 192, 0.5)
    assert by_mm[0, 0].sum() == 48 and by_mm[1, 0].sum() == 144
    by_frac = AxialPartitioner(("a", "b", "c"), fractions=(0.25, 0.25, 0.5)).masks(4, 192, 0.5)
    assert by_frac.sum((1, 2)).tolist() == [4 * 48, 4 * 48, 4 * 96]
    with pytest.raises(DataError, match="reach past the image length 96 mm"):
        AxialPartitioner(("a", "b"), boundaries_mm=(100.0,)).masks(4, 192, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fractions": (0.5, 0.5), "boundaries_mm": (3.0,), "names": ("a", "b")}, "not both"),
        ({"fractions": (0.5, 0.6), "names": ("a", "b")}, "sum to 1"),
        ({"fractions": (0.5, 0.5)}, "2 entries for 3 names"),
        ({"boundaries_mm": (40.0, 20.0)}, "strictly increasing"),
        ({"boundaries_mm": (40.0,)}, "needs 2 cut points"),
        ({"names": ("a", "a")}, "unique"),
    ],
)
def test_axial_config_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        AxialConfig(**kwargs)


def test_landmarks_read_per_image_boundaries_and_fail_clearly_without_them():
    part = LandmarkPartitioner()
    a = part.masks(8, 192, 0.5, {"boundaries_mm": [20.0, 50.0]})
    b = part.masks(8, 192, 0.5, {"boundaries_mm": [40.0, 70.0]})
    assert a[0, 0].sum() == 40 and b[0, 0].sum() == 80
    with pytest.raises(DataError, match="needs per-image metadata 'boundaries_mm'"):
        part.masks(8, 192, 0.5)
    with pytest.raises(DataError, match=r"sample x\.npz.*has 1 boundaries"):
        part.masks(8, 192, 0.5, {"boundaries_mm": [20.0], "source": "x.npz"})
    with pytest.raises(DataError, match="must increase strictly inside"):
        part.masks(8, 192, 0.5, {"boundaries_mm": [50.0, 20.0]})
    metadata = [{"boundaries_mm": [20.0, 50.0]}, {"boundaries_mm": [40.0, 70.0]}]
    assert torch.equal(batch_region_masks(part, 8, 192, 0.5, metadata), torch.stack([a, b]))


def test_grid_tiles_and_names():
    part = GridPartitioner(2, 3)
    assert part.region_names == ("r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2")
    masks = part.masks(32, 192, 0.5)
    assert masks[4, 16:, 64:128].eq(1).all() and masks[4].sum() == 16 * 64


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(PARTITIONERS),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    spacing=st.sampled_from([0.25, 0.5]),
)
def test_regional_areas_sum_to_the_global_area(name, batch, seed, spacing):
    g = torch.Generator().manual_seed(seed)
    width = round(96 / spacing)  # a 96 mm vessel segment
    probs = torch.randn(batch, 4, 8, width, generator=g).softmax(1)  # (B, C, H, W)
    regions = build(name).masks(8, width, spacing, landmarks(width, spacing))[None]  # (1, K, H, W)
    areas = regional_areas(probs, regions, spacing**2)  # (B, C, K)
    total = probs.sum((2, 3)) * spacing**2  # (B, C)
    torch.testing.assert_close(areas.sum(2), total, rtol=1e-5, atol=1e-4)


def test_variable_areas_are_differentiable_and_structure_major():
    probs = torch.rand(2, 4, 8, 12).softmax(1).requires_grad_(True)
    regions = build("axial-thirds").masks(8, 12, 1.0)[None]
    out = variable_areas(probs, regions, 1.0, (2, 3, 1))  # (B, 9): structure-major, labels 2, 3, 1
    out.sum().backward()
    assert probs.grad is not None and probs.grad[:, 1:].eq(1).all() and probs.grad[:, 0].eq(0).all()
    torch.testing.assert_close(out[:, 6], probs[:, 1, :, :4].sum((1, 2)))  # la_proximal: lumen, first third


class Overlapping:
    """A broken partitioner: its two regions overlap on the middle columns."""

    region_names = ("left", "right")

    def masks(self, height, width, spacing_mm, metadata=None):
        m = torch.zeros(2, height, width)
        m[0, :, : width // 2 + 2] = 1
        m[1, :, width // 2 :] = 1
        return m


class Gappy(Overlapping):
    def masks(self, height, width, spacing_mm, metadata=None):
        m = super().masks(height, width, spacing_mm, metadata)
        m[:, :, width // 2 - 2 : width // 2 + 2] = 0
        return m


@pytest.mark.parametrize(("broken", "message"), [(Overlapping(), "overlap"), (Gappy(), "do not cover")])
def test_contract_check_catches_broken_partitioners(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_partitioner(broken)
