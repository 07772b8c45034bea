"""The phantom: its contract, determinism, marginals and the ground-truth counterfactuals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.data.phantom_geometry import AREA_RTOL
from causalimg.errors import ConfigError, InterventionError
from causalimg.plugins.manager import load_registry
from causalimg.regions.axial import AxialPartitioner
from causalimg.regions.grid import GridPartitioner
from causalimg.testing import check_data_source

SMALL = dict(n_train=48, n_val=8, n_test=8)
ATOL = 1e-4  # mm^2: below this, areas are limited by the 2^-15 quantisation of the fractions


def make(tmp_path, **kw) -> PhantomSource:
    return PhantomSource(PhantomConfig(**{**SMALL, **kw}), AxialPartitioner(), tmp_path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> PhantomSource:
    return make(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def aged(tmp_path_factory) -> PhantomSource:
    return make(tmp_path_factory.mktemp("aged"), age_effect=0.5, cache=False)


def test_plugin_builds_from_the_registry_and_meets_the_contract(tmp_path):
    spec = load_registry().get("dataset", "phantom")
    src = spec.factory(spec.config(**SMALL), partitioner=AxialPartitioner(), root=tmp_path)
    check_data_source(src)
    check_data_source(src, "test")
    assert src.image_shape == (32, 192) and src.schema.names[0] == "cpa_proximal" and src.schema.graph["la_mid"] == ()
    assert list(tmp_path.glob("phantom-*/train-48/done.json")), "the split is cached on disk"


def test_cache_and_direct_rendering_are_bit_identical(source, tmp_path):
    direct = make(tmp_path, cache=False).split("train")
    cached = source.split("train")
    for i in (0, 17, 47):
        a, b = cached[i], direct[i]
        assert all(torch.equal(a[k], b[k]) for k in a), f"item {i} differs"


def test_same_seed_same_data_other_seed_or_split_other_data(source, tmp_path):
    again = make(tmp_path / "again")
    assert torch.equal(again.split("train")[3]["image"], source.split("train")[3]["image"])
    other = make(tmp_path / "other", seed=1)
    assert not torch.equal(other.split("train")[3]["image"], source.split("train")[3]["image"])
    assert not torch.equal(source.split("val")[3]["image"], source.split("train")[3]["image"])


def test_marginals_are_those_of_coronary_scprs(tmp_path):
    src = make(tmp_path, n_train=400, cache=False)
    r = src.render_indices("train", np.arange(400))
    pa = r.parents  # (N, 9): cpa, ncpa, la per third
    cpa, ncpa, la = pa[:, 0:3], pa[:, 3:6], pa[:, 6:9]
    assert 0.4 < (cpa == 0).mean() < 0.6, "about half the regions have no calcium"
    assert cpa.max() <= 25 and ncpa.max() <= 40 and la.min() >= 39 and la.max() <= 140
    assert cpa[:, 2].mean() < cpa[:, 0].mean() and ncpa[:, 2].mean() < ncpa[:, 0].mean(), "less plaque distally"
    assert la[:, 0].mean() > la[:, 1].mean() > la[:, 2].mean(), "the lumen tapers"
    exo = src.exogenous_batch("train", np.arange(400))
    assert (
        (exo.r_prox >= 1.5).all()
        and (exo.r_prox <= 2.0).all()
        and (exo.r_dist >= 0.7).all()
        and (exo.r_dist <= 1.0).all()
    )
    image = r.image[:, 0]  # (N, H, W): the lumen is the brightest band, centred, and fades distally
    centre, edge = image[:, 14:18].mean(), image[:, :3].mean()
    assert centre > edge + 0.3
    assert image[:, 14:18, :20].mean() > image[:, 14:18, -20:].mean()


def test_requested_areas_are_met_within_half_a_percent(source):
    exo = source.exogenous_batch("train", np.arange(48))
    wanted = source.third_targets(exo)  # the thirds are the regions here
    got = source.render(exo).parents
    np.testing.assert_allclose(got, wanted, rtol=AREA_RTOL, atol=ATOL)
    assert ((wanted == 0) == (got == 0)).all(), "no calcium means exactly zero calcified area"


def test_areas_do_not_depend_on_the_pixel_spacing(tmp_path):
    coarse, fine = make(tmp_path / "a", cache=False), make(tmp_path / "b", spacing_mm=0.25, cache=False)
    a, b = coarse.render_indices("val", np.arange(8)), fine.render_indices("val", np.arange(8))
    assert b.image.shape[-2:] == (64, 384)
    np.testing.assert_allclose(a.parents, b.parents, rtol=AREA_RTOL, atol=1e-3)


def test_null_counterfactual_reproduces_the_item_and_batches_match(source):
    item = source.split("train")[5]
    exo = source.unpack(item["exogenous"].numpy())
    image, masks, parents = source.true_counterfactual(exo, {})
    assert (
        torch.equal(image, item["image"])
        and torch.equal(masks, item["masks"])
        and torch.equal(parents, item["parents"])
    )
    batch = source.true_counterfactual_batch("train", [5, 6], [{"cpa_mid": 3.0}, {}])
    single = source.true_counterfactual(source.exogenous("train", 5), {"cpa_mid": 3.0})
    assert torch.equal(batch["image"][0], single[0]) and torch.equal(
        batch["image"][1], source.split("train")[6]["image"]
    )
    torch.testing.assert_close(source.schema.measure(batch["masks"], source.regions[None], 0.25), batch["parents"])


def test_bad_interventions_are_refused(source):
    exo = source.exogenous("train", 0)
    with pytest.raises(InterventionError, match="unknown variable 'cpa_left'"):
        source.true_counterfactual(exo, {"cpa_left": 1.0})
    with pytest.raises(InterventionError, match="finite value >= 0"):
        source.true_counterfactual(exo, {"la_mid": -3.0})
    with pytest.raises(InterventionError, match="ncpa_mid=.*does not fit"):
        source.true_counterfactual(exo, {"ncpa_mid": 900.0})


def test_age_graph_propagates_through_the_true_mechanism(aged):
    assert (
        aged.schema.names[0] == "age" and aged.schema.graph["cpa_mid"] == ("age",) and aged.schema.graph["la_mid"] == ()
    )
    check_data_source(aged)
    exo = aged.exogenous("train", 2)
    _, _, pa = aged.true_counterfactual(exo, {})
    age = float(pa[0])
    _, _, older = aged.true_counterfactual(exo, {"age": age + 20.0})
    plaque = slice(1, 7)
    np.testing.assert_allclose(older[plaque], pa[plaque] * np.exp(0.5), rtol=2 * AREA_RTOL, atol=1e-4)
    assert torch.equal(older[7:], pa[7:]), "lumen areas are not children of age"
    _, _, fixed = aged.true_counterfactual(exo, {"age": age + 20.0, "ncpa_mid": 5.0})
    assert abs(float(fixed[5]) - 5.0) < 5.0 * AREA_RTOL


def test_partitions_that_are_not_axial_or_too_short_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"axial partition .* column 0 .* lies in regions \['r0c0', 'r1c0'\]"):
        PhantomSource(PhantomConfig(**SMALL), GridPartitioner(2, 3), tmp_path)
    short = AxialPartitioner(("a", "b", "c"), boundaries_mm=(40.0, 46.0))
    with pytest.raises(ConfigError, match="region 'b' is 6 mm long in every image; .* at least 8 mm long"):
        PhantomSource(PhantomConfig(**SMALL), short, tmp_path)
    end = AxialPartitioner(("a", "b"), boundaries_mm=(7.0,))
    with pytest.raises(ConfigError, match="region 'a' is 7 mm long in every image"):
        PhantomSource(PhantomConfig(**SMALL), end, tmp_path)
    assert PhantomSource(PhantomConfig(**SMALL), GridPartitioner(1, 4), tmp_path).schema.regions[-1] == "r0c3"


def test_spacing_must_fit_the_regions():
    with pytest.raises(ValueError, match="must divide 32 mm"):
        PhantomConfig(spacing_mm=0.3)


def test_contact_sheet_is_a_png_of_the_samples(source, tmp_path):
    from PIL import Image

    from causalimg.report.contact_sheet import render_contact_sheet

    path = render_contact_sheet(source, "val", 2, tmp_path / "sheet.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.height > 300 and im.width > 1000


def test_contract_check_catches_parents_that_are_not_the_measured_areas(source):
    class Shifted:
        schema, image_shape, spacing_mm = source.schema, source.image_shape, source.spacing_mm

        def split(self, name):
            return [{**item, "parents": item["parents"] + 1.0} for item in (source.split(name)[i] for i in range(2))]

    with pytest.raises(AssertionError, match="!= schema.measure"):
        check_data_source(Shifted())
