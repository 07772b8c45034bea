"""The phantom's confounds: severity correlates plaque across regions and carries non-local cues
only when switched on; interventions leave the cues alone; the clean phantom keeps its marginals."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from causalimg.config.loader import load_config
from causalimg.data import phantom_geometry as geo
from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.data.phantom_confounds import ConfoundConfig, attenuation_gradient
from causalimg.data.phantom_render import WINDOW_HU, soft_masks
from causalimg.regions.axial import AxialPartitioner

N = 300
ROOT = tempfile.gettempdir()  # nothing is written with cache=False
PRESET = load_config("cpu-confounded").data.confounds


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable")  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def make(confounds: ConfoundConfig) -> PhantomSource:
    return PhantomSource(PhantomConfig(n_train=N, cache=False, confounds=confounds), AxialPartitioner(), ROOT)


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[PhantomSource, object]]:
    out = {}
    for name, conf in (("clean", ConfoundConfig()), ("confounded", PRESET)):
        source = make(conf)
        out[name] = (source, source.render_indices("train", np.arange(N)))
    return out


def test_the_preset_is_the_cpu_config_with_confounds_on():
    cpu, confounded = load_config("cpu").model_dump(), load_config("cpu-confounded").model_dump()
    assert confounded["data"].pop("confounds") == PRESET.model_dump() and PRESET.active
    assert cpu["data"].pop("confounds") == ConfoundConfig().model_dump() and not ConfoundConfig().active
    assert confounded.pop("run")["dir"] != cpu.pop("run")["dir"]
    assert confounded == cpu


def test_severity_correlates_plaque_across_regions_only_when_on(rendered):
    for name, (_, r) in rendered.items():
        plaque = r.parents[:, 0:3] + r.parents[:, 3:6]  # (N, 3) calcified + non-calcified per third
        rho = [spearman(plaque[:, i], plaque[:, j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        if name == "clean":
            assert max(abs(v) for v in rho) < 0.15, f"clean thirds correlate: {rho}"
        else:
            assert min(rho) > 0.3, f"confounded thirds do not correlate: {rho}"


def test_non_local_cues_go_with_plaque_burden_only_when_on(rendered):
    for name, (source, r) in rendered.items():
        burden = r.parents[:, :6].sum(1)  # all plaque, every region
        tag = attenuation_gradient(r.image[:, 0], soft_masks(r.fg)[:, 1], source.spacing_mm, WINDOW_HU)
        exo = source.exogenous_batch("train", np.arange(N))
        cues = {"attenuation gradient in the image": tag, "point spread": exo.sigma_mm, "calcium HU": exo.hu_ca,
                "distal lumen": -r.parents[:, 8]}  # fmt: skip
        for cue, values in cues.items():
            rho = spearman(values, burden)
            if name == "clean":
                assert abs(rho) < 0.15, f"{cue} goes with plaque in the clean phantom: {rho:.2f}"
            else:
                assert rho > 0.15, f"{cue} does not go with plaque in the confounded phantom: {rho:.2f}"


def test_an_intervention_on_plaque_leaves_every_cue_alone(rendered):
    source, r = rendered["confounded"]
    tag = attenuation_gradient(r.image[:, 0], soft_masks(r.fg)[:, 1], source.spacing_mm, WINDOW_HU)
    indices = list(range(8))
    heavy = [{f"{s}_{k}": 0.0 if s == "cpa" else 30.0 for s in ("cpa", "ncpa") for k in ("proximal", "mid")}] * 8
    cf = source.true_counterfactual_batch("train", indices, heavy)
    assert (cf["parents"][:, 3:5] > 29.8).all() and (cf["parents"][:, 0:2] == 0).all()
    tag_cf = attenuation_gradient(cf["image"][:, 0].numpy(), cf["masks"][:, 1].numpy(), source.spacing_mm, WINDOW_HU)
    # the cue a regressor could read stays with the image, not with the intervened plaque
    assert np.abs(tag_cf - tag[indices]).max() < 0.1 * tag.std()
    distal = cf["regions"][0, 2, 0].bool()  # the distal third: nothing intervened there
    assert np.array_equal(cf["image"][..., distal].numpy(), r.image[indices][..., distal])


def kumaraswamy_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return 1.0 - (1.0 - np.clip(x, 0.0, 1.0) ** a) ** b


def ks(sample: np.ndarray, cdf) -> float:
    """One-sample Kolmogorov-Smirnov statistic."""
    x = np.sort(sample)
    f = cdf(x)
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


def test_the_clean_phantom_keeps_its_documented_per_third_marginals_and_confounds_keep_them_too(rendered):
    for _, r in rendered.values():
        pa = r.parents
        for third in range(3):
            for col, zero_p, most, a, b in (
                (third, geo.CPA_ZERO_P[third], geo.CPA_MAX, 1.2, geo.CPA_KUMA_B[third]),
                (3 + third, geo.NCPA_ZERO_P[third], geo.NCPA_MAX, 1.3, geo.NCPA_KUMA_B[third]),
            ):
                v = pa[:, col]
                zero = (v < 1e-3).mean()
                assert abs(zero - zero_p) < 4 * np.sqrt(zero_p * (1 - zero_p) / N), (col, zero)
                positive = v[v >= 1e-3] / most
                assert ks(positive, lambda x, a=a, b=b: kumaraswamy_cdf(x, a, b)) < 1.95 / np.sqrt(len(positive))
            lo, hi = geo.LA_RANGE[third]
            assert ks(pa[:, 6 + third], lambda x, lo=lo, hi=hi: np.clip((x - lo) / (hi - lo), 0, 1)) < 1.95 / np.sqrt(N)
