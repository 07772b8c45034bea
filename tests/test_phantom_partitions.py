"""The phantom's truth under any axial partition: random partitions, per-image landmarks, a
third-party partitioner; locality and exactness of true counterfactuals, and that the locality
test catches a broken locality mechanism."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from causalimg.data import phantom_geometry as geo
from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.data.phantom_geometry import AREA_RTOL
from causalimg.errors import InterventionError
from causalimg.plugins.manager import load_registry
from causalimg.regions.axial import AxialPartitioner
from causalimg.regions.landmarks import LandmarkPartitioner
from causalimg.testing import check_data_source, check_partitioner

ATOL = 1e-4  # mm^2: the 2^-15 quantisation of the fractions
SMALL = dict(n_train=16, n_val=4, n_test=4, cache=False)
ROOT = tempfile.gettempdir()  # nothing is written with cache=False
MIN_MM = 8.5  # the phantom's shortest region plus a pixel
PLAQUE_MAX = {"cpa": 25.0, "ncpa": 40.0}  # per 32 mm, the clean phantom's largest areas


def unequal_axial(names: tuple[str, ...], lengths: list[float]):
    """The out-of-tree example partitioner, built through its entry point."""
    spec = load_registry().get("partitioner", "unequal-axial")
    return spec.factory(spec.config(region_names=names, lengths_mm=tuple(lengths[:-1])))


@st.composite
def partitions(draw):
    """2-6 axial regions of unequal lengths (fixed boundaries, the plugin's lengths) or per-image landmarks."""
    k = draw(st.integers(2, 6))
    names = tuple(f"s{i}" for i in range(k))
    kind = draw(st.sampled_from(["axial", "unequal-axial", "landmarks"]))
    if kind == "landmarks":
        return LandmarkPartitioner(names)
    weights = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))) + 1e-3
    shortest = np.full(k, MIN_MM)
    lengths = (shortest + (geo.FOV_W - shortest.sum()) * weights / weights.sum()).tolist()
    if kind == "axial":
        return AxialPartitioner(names, boundaries_mm=tuple(np.cumsum(lengths)[:-1].tolist()))
    return unequal_axial(names, lengths)


def assert_local_and_exact(source: PhantomSource, exo: geo.PhantomExogenous, var: str, target: float) -> None:
    """do(var := target) on one image: met within tolerance, every pixel outside its region and every
    other variable unchanged. Raises InterventionError where the target cannot be met."""
    x, m, pa = source.true_counterfactual(exo, {})
    x2, m2, pa2 = source.true_counterfactual(exo, {var: target})
    names = source.schema.names
    v = names.index(var)
    structure, region = var.split("_", 1)
    assert abs(float(pa2[v]) - target) <= AREA_RTOL * target + ATOL, f"{var}: {float(pa2[v])} != {target}"
    inside = source.region_masks(exo)[0, source.region_names.index(region), 0].bool()  # (W,) the region's columns
    assert torch.equal(x[..., ~inside], x2[..., ~inside]), f"do({var}) changed image pixels outside region {region}"
    assert torch.equal(m[..., ~inside], m2[..., ~inside]), f"do({var}) changed masks outside region {region}"
    others = [i for i, n in enumerate(names) if not n.endswith(f"_{region}")]
    assert torch.equal(pa2[others], pa[others]), "other regions' variables must be exactly unchanged"
    same = [i for i, n in enumerate(names) if n.endswith(f"_{region}") and i != v]
    torch.testing.assert_close(pa2[same], pa[same], rtol=AREA_RTOL, atol=ATOL)
    if structure != "la":
        la = names.index(f"la_{region}")
        assert pa2[la] == pa[la], "plaque changes never change the lumen"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    partition=partitions(),
    index=st.integers(0, 15),
    structure=st.sampled_from(["cpa", "ncpa", "la"]),
    region=st.integers(0, 5),
    u=st.floats(0.0, 1.0),
    zero=st.booleans(),
)
def test_true_counterfactuals_are_local_and_exact_under_random_partitions(partition, index, structure, region, u, zero):
    source = PhantomSource(PhantomConfig(**SMALL), partition, ROOT)
    name = source.region_names[region % len(source.region_names)]
    exo = source.exogenous("train", index)
    var = f"{structure}_{name}"
    if structure == "la":
        _, _, pa = source.true_counterfactual(exo, {})
        target = float(pa[source.schema.index(var)]) * (0.6 + 0.8 * u)
    else:
        length = float(source.region_masks(exo)[0, region % len(source.region_names), 0].sum()) * source.spacing_mm
        target = 0.0 if zero else u * PLAQUE_MAX[structure] * length / 32.0
    try:
        assert_local_and_exact(source, exo, var, target)
    except InterventionError:  # a target that cannot exist in this image's geometry is refused, never faked
        assume(False)


def test_most_targets_are_reachable_and_refusals_name_the_variable():
    """Uniform targets over each variable's range: most are met (the tests above are not vacuous)."""
    source = PhantomSource(PhantomConfig(**SMALL), AxialPartitioner(("a", "b", "c", "d")), ROOT)
    rng = np.random.default_rng(0)
    met = 0
    for i in range(24):
        var = source.schema.area_names[i % len(source.schema.area_names)]
        structure = var.split("_")[0]
        high = {"cpa": 18.0, "ncpa": 30.0, "la": 100.0}[structure]
        target = float(rng.uniform(10.0 if structure == "la" else 0.0, high))
        try:
            assert_local_and_exact(source, source.exogenous("train", i % 16), var, target)
            met += 1
        except InterventionError as err:
            assert str(err).startswith(f"{var}={target:.3f} mm^2")
    assert met >= 18, f"only {met} of 24 targets met"


def test_the_locality_test_fails_when_the_locality_margin_is_removed(monkeypatch):
    source = PhantomSource(PhantomConfig(**SMALL), AxialPartitioner(("a", "b", "c", "d")), ROOT)
    exo = source.exogenous("train", 3)
    _, _, pa = source.true_counterfactual(exo, {})
    target = float(pa[source.schema.index("la_b")]) * 1.3
    assert_local_and_exact(source, exo, "la_b", target)
    monkeypatch.setattr(geo, "MARGIN_MM", 0.0)  # the intervention may now act up to the region's boundary
    with pytest.raises(AssertionError, match="changed image pixels outside region b"):
        assert_local_and_exact(source, exo, "la_b", target)


def test_landmarks_come_from_each_image_and_items_carry_their_regions():
    part = LandmarkPartitioner(("p", "m1", "m2", "d"))
    source = PhantomSource(PhantomConfig(**SMALL), part, ROOT)
    assert source.per_image and source.regions is None
    check_data_source(source)
    data = source.split("train")
    cuts = [data.metadata(i)["boundaries_mm"] for i in range(4)]
    assert all(len(c) == 3 for c in cuts) and len({tuple(c) for c in cuts}) == 4, "cut points differ per image"
    for i in range(4):
        assert torch.equal(data[i]["regions"], part.masks(32, 192, 0.5, data.metadata(i)))
        lengths = np.diff([0.0, *cuts[i], geo.FOV_W])
        assert (abs(lengths - 24.0) <= 0.2 * 24.0 * 2 + 1e-9).all() and lengths.min() >= MIN_MM
    batch = source.true_counterfactual_batch("train", [0, 1], [{"cpa_m1": 4.0}, {"la_d": 30.0}])
    assert torch.equal(batch["regions"][1], data[1]["regions"])
    torch.testing.assert_close(source.schema.measure(batch["masks"], batch["regions"], 0.25), batch["parents"])


class EndsAndMiddle:
    """A partitioner as a third party writes it from the docs: both ends of the vessel are one region."""

    region_names = ("ends", "middle")

    def masks(self, height, width, spacing_mm, metadata=None):
        x = (torch.arange(width) + 0.5) * spacing_mm
        middle = ((x > 24.0) & (x < 72.0)).float()  # (W,)
        return torch.stack([1.0 - middle, middle])[:, None, :].expand(2, height, width).contiguous()


def test_a_third_party_partition_with_a_region_in_two_pieces():
    part = EndsAndMiddle()
    check_partitioner(part)
    source = PhantomSource(PhantomConfig(**SMALL), part, ROOT)
    check_data_source(source)
    exo = source.exogenous("train", 5)
    for var, target in (("cpa_ends", 9.0), ("ncpa_middle", 14.0), ("la_ends", 90.0), ("cpa_middle", 0.0)):
        assert_local_and_exact(source, exo, var, target)


def test_age_scales_plaque_in_every_region_of_any_partition():
    source = PhantomSource(PhantomConfig(**SMALL, age_effect=0.5), AxialPartitioner(("a", "b", "c", "d")), ROOT)
    exo = source.exogenous("train", 2)
    _, _, pa = source.true_counterfactual(exo, {})
    _, _, older = source.true_counterfactual(exo, {"age": float(pa[0]) + 20.0})
    plaque = slice(1, 9)  # cpa_a..d, ncpa_a..d
    np.testing.assert_allclose(older[plaque], pa[plaque] * np.exp(0.5), rtol=2 * AREA_RTOL, atol=1e-4)
    assert torch.equal(older[9:], pa[9:]), "lumen areas are not children of age"


def test_joint_interventions_and_a_refusal_that_would_move_another_variable():
    source = PhantomSource(PhantomConfig(**SMALL), AxialPartitioner(("a", "b", "c", "d")), ROOT)
    exo = source.exogenous("train", 0)
    _, _, pa = source.true_counterfactual(exo, {})
    do = {"la_b": float(pa[source.schema.index("la_b")]) * 1.2, "ncpa_b": 9.0, "cpa_b": 2.0, "cpa_d": 0.0}
    _, _, pa2 = source.true_counterfactual(exo, do)
    for var, target in do.items():
        assert abs(float(pa2[source.schema.index(var)]) - target) <= AREA_RTOL * target + ATOL, var
    untouched = [source.schema.index(v) for v in source.schema.names if v.endswith(("_a", "_c")) or v == "ncpa_d"]
    assert torch.equal(pa2[untouched], pa[untouched])
    far = float(pa[source.schema.index("la_a")]) * 3.0  # a lumen this wide pushes the calcium out of view
    with pytest.raises(InterventionError, match=r"la_a=.* without changing cpa_a: .* out of the 16 mm field"):
        source.true_counterfactual(exo, {"la_a": far})
