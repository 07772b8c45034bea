"""The SCM graph and the DSCM's abduction-action-prediction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalimg.core.mechanism import Exogenous
from causalimg.core.scm import DSCM, SCM
from causalimg.core.transform import VariableTransform
from causalimg.errors import ConfigError, InterventionError
from causalimg.mechanisms.flows import SplineFlow

pytestmark = pytest.mark.usefixtures("one_thread")


class ShiftImage(nn.Module):
    """Image mechanism with a known answer: x = mean(pa_x) + u on every pixel."""

    def loc(self, pa: torch.Tensor) -> torch.Tensor:
        return pa.mean(1).reshape(-1, 1, 1, 1).expand(-1, 1, 4, 6)

    def loss(self, x, pa):
        nll = ((x - self.loc(pa)) ** 2).mean((1, 2, 3))
        return {"nelbo": nll, "nll": nll, "kl": torch.zeros_like(nll)}

    def abduct(self, x, pa, t=0.0):
        return Exogenous(latents=[], noise=x - self.loc(pa))

    def predict(self, exogenous, pa):
        return self.loc(pa) + exogenous.noise

    def sample(self, pa, t=1.0):
        return self.loc(pa)


def test_topological_order_follows_edges() -> None:
    scm = SCM({"c": ["a", "b"], "b": ["a"], "a": []})
    assert scm.order == ("a", "b", "c")
    assert scm.descendants(["a"]) == {"b", "c"}
    assert scm.descendants(["c"]) == set()
    assert scm.image_parents == ("c", "b", "a")
    assert SCM({"a": [], "b": []}, image_parents=["b"]).image_parents == ("b",)


@pytest.mark.parametrize(
    ("graph", "image_parents", "message"),
    [
        ({"a": ["b"], "b": ["c"], "c": ["a"]}, None, r"cycle: (a -> c -> b -> a|b -> a -> c -> b|c -> b -> a -> c)"),
        ({"a": ["a"]}, None, "cycle: a -> a"),
        ({"a": ["zz"]}, None, "parent 'zz' of 'a' is not a variable"),
        ({"a": [], "image": ["a"]}, None, "'image' is the image node"),
        ({"a": ["image"]}, None, "image is a sink"),
        ({"a": []}, ["q"], "image_parents: 'q' is not a variable"),
        ({"a": "b", "b": []}, None, "must be a list of names"),
    ],
)
def test_invalid_graphs_are_config_errors(graph, image_parents, message) -> None:
    with pytest.raises(ConfigError, match=message):
        SCM(graph, image_parents)


def _dscm(graph: dict[str, list[str]]) -> DSCM:
    names = tuple(graph)
    transform = VariableTransform(names, torch.zeros(len(names)), torch.full((len(names),), 10.0))
    scm = SCM(graph)
    flows = {v: SplineFlow(len(ps), hidden=(16, 16)) for v, ps in graph.items()}
    return DSCM(scm, flows, ShiftImage(), transform)


def _fit(dscm: DSCM, pa: torch.Tensor, steps: int = 200) -> None:
    opt = torch.optim.Adam(dscm.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        (-dscm.flow_log_prob(pa).mean()).backward()
        opt.step()


@pytest.fixture(scope="module")
def fitted() -> tuple[DSCM, torch.Tensor]:
    """a -> b (b = a + small noise, in mm^2 on [0, 10]), c independent; fitted by maximum likelihood."""
    torch.manual_seed(0)
    a = torch.rand(2048) * 6 + 2
    b = (a + 0.3 * torch.randn(2048)).clamp(0, 10)
    c = torch.rand(2048) * 10
    pa = torch.stack([a, b, c], 1)
    dscm = _dscm({"a": [], "b": ["a"], "c": []})
    _fit(dscm, pa)
    return dscm, pa


def test_counterfactual_moves_descendants_only(fitted) -> None:
    dscm, pa = fitted
    pa = pa[:64]
    with torch.no_grad():
        cf = dscm.counterfactual_parents(pa, {"a": 8.0})
    assert torch.all(cf[:, 0] == 8.0)
    assert torch.equal(cf[:, 2], pa[:, 2])  # non-descendant: bit-exact
    shift = (cf[:, 1] - pa[:, 1]).mean().item()  # b follows a: a moved by +3 on average
    assert shift > 1.0, shift
    with torch.no_grad():
        cf_b = dscm.counterfactual_parents(pa, {"b": 5.0})
    assert torch.equal(cf_b[:, 0], pa[:, 0]) and torch.equal(cf_b[:, 2], pa[:, 2])  # b's parent stays


def test_null_intervention_reproduces_factual_values(fitted) -> None:
    dscm, pa = fitted
    pa = pa[:64]
    with torch.no_grad():
        cf = dscm.counterfactual_parents(pa, {"a": pa[:, 0]})
    torch.testing.assert_close(cf, pa, atol=1e-3, rtol=0)


def test_several_variables_at_once_and_image_counterfactual(fitted) -> None:
    dscm, pa = fitted
    pa = pa[:8]
    x = torch.rand(8, 1, 4, 6)
    with torch.no_grad():
        x_cf, pa_cf = dscm.counterfactual(x, pa, {"a": 3.0, "c": torch.full((8,), 7.0)})
        expected_shift = dscm.transform.normalise(pa_cf).mean(1) - dscm.transform.normalise(pa).mean(1)
    assert torch.all(pa_cf[:, 0] == 3.0) and torch.all(pa_cf[:, 2] == 7.0)
    torch.testing.assert_close(x_cf - x, expected_shift.reshape(-1, 1, 1, 1).expand_as(x))


@pytest.mark.parametrize(
    ("do", "message"),
    [
        ({"nope": 1.0}, "unknown variable 'nope'"),
        ({"image": 1.0}, "cannot intervene on 'image'"),
        ({"a": 11.0}, r"outside the observed support \[0, 10\] of a"),
        ({"a": torch.tensor([1.0, -3.0])}, "outside the observed support"),
        ({"a": float("nan")}, "not finite"),
        ({}, "empty intervention"),
    ],
)
def test_bad_interventions_are_intervention_errors(fitted, do, message) -> None:
    dscm, pa = fitted
    with pytest.raises(InterventionError, match=message):
        dscm.counterfactual_parents(pa[:2], do)


def test_dscm_rejects_mismatched_mechanisms() -> None:
    transform = VariableTransform(("a", "b"), torch.zeros(2), torch.ones(2))
    with pytest.raises(ConfigError, match=r"missing for \['b'\]"):
        DSCM(SCM({"a": [], "b": []}), {"a": SplineFlow(0)}, ShiftImage(), transform)
    with pytest.raises(ConfigError, match="differ from the transform"):
        DSCM(SCM({"a": []}), {"a": SplineFlow(0)}, ShiftImage(), transform)


def test_sample_follows_the_graph(fitted) -> None:
    dscm, _ = fitted
    torch.manual_seed(1)
    x, pa = dscm.sample(512)
    assert x.shape == (512, 1, 4, 6) and pa.shape == (512, 3)
    corr = torch.corrcoef(pa.T)
    assert corr[0, 1] > 0.8 and abs(corr[0, 2]) < 0.2


def test_dscm_composes_flows_and_hvae() -> None:
    """The null intervention through flows and a real HVAE gives back the image; a real one moves it."""
    from causalimg.mechanisms.hvae import HVAE, HVAEConfig

    torch.manual_seed(0)
    graph = {"a": [], "b": ["a"]}
    transform = VariableTransform(("a", "b"), torch.zeros(2), torch.full((2,), 10.0))
    config = HVAEConfig(preset=None, widths=(8,) * 4, enc_blocks=(1,) * 4, dec_blocks=(1,) * 4,
                        bottleneck=0.5, z_dim=2, embed_dim=8, dropout=0.0)  # fmt: skip
    image = HVAE.from_config(config, image_shape=(4, 8), num_parents=2)
    with torch.no_grad():  # un-zero the last layers so that the parents reach the pixels
        for p in image.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    dscm = DSCM(SCM(graph), {v: SplineFlow(len(ps), hidden=(8,)) for v, ps in graph.items()}, image, transform).eval()
    x = torch.rand(3, 1, 4, 8) * 2 - 1
    pa = torch.tensor([[2.0, 3.0], [5.0, 5.5], [7.0, 6.0]])
    with torch.no_grad():
        x_null, pa_null = dscm.counterfactual(x, pa, {"a": pa[:, 0]})
        x_cf, pa_cf = dscm.counterfactual(x, pa, {"a": 9.0})
    torch.testing.assert_close(pa_null, pa, atol=1e-3, rtol=0)
    torch.testing.assert_close(x_null, x, atol=1e-3, rtol=0)
    assert (x_cf - x).abs().max() > 1e-3 and torch.all(pa_cf[:, 0] == 9.0)
