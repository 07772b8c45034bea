"""Bad interventions through the public DSCM API (``counterfactual`` and ``counterfactual_parents``):
each an InterventionError naming the variable and the problem, raised before any network runs.

tests/test_scm.py checks the messages of the parents-only path; here every public entry point gets
every class of mistake, and nothing is computed for a refused intervention.
"""

from __future__ import annotations

import pytest
import torch
from test_scm import ShiftImage

from causalimg.core.scm import DSCM, SCM
from causalimg.core.transform import VariableTransform
from causalimg.errors import ConfigError, InterventionError
from causalimg.mechanisms.flows import SplineFlow


class CountingImage(ShiftImage):
    """The known-answer image mechanism, counting abductions: a refused intervention makes none."""

    calls = 0

    def abduct(self, x, pa, t=0.0):
        CountingImage.calls += 1
        return super().abduct(x, pa, t)


@pytest.fixture(scope="module")
def dscm() -> DSCM:
    """a -> b, c a root; every variable observed on [0, 10] mm^2."""
    torch.manual_seed(0)
    transform = VariableTransform(("a", "b", "c"), torch.zeros(3), torch.full((3,), 10.0))
    flows = {"a": SplineFlow(0, hidden=(8,)), "b": SplineFlow(1, hidden=(8,)), "c": SplineFlow(0, hidden=(8,))}
    return DSCM(SCM({"a": [], "b": ["a"], "c": []}), flows, CountingImage(), transform)


BATCH = 3
BAD = [
    ({"d": 1.0}, r"unknown variable 'd' in do\(\.\.\.\); known: a, b, c"),
    ({"A": 1.0}, "unknown variable 'A'"),
    ({3: 1.0}, "unknown variable 3"),
    ({"image": torch.zeros(BATCH, 1, 4, 6)}, "cannot intervene on 'image'"),
    ({"a": 1.0, "image": 0.0}, "cannot intervene on 'image'"),
    ({"a": 10.5}, r"do\(a := 10.5\) is outside the observed support \[0, 10\] of a"),
    ({"b": -0.5}, r"do\(b := -0.5\) is outside the observed support \[0, 10\] of b"),
    ({"c": torch.tensor([1.0, 2.0, 1e6])}, r"outside the observed support .* of c"),
    ({"a": float("inf")}, r"do\(a\): value is not finite"),
    ({"a": torch.tensor([1.0, float("nan"), 2.0])}, r"do\(a\): value is not finite"),
    ({"a": torch.ones(BATCH + 1)}, rf"do\(a\): expected a scalar or {BATCH} values, got {BATCH + 1}"),
    ({"a": "3"}, r"do\(a\): '3' is not a number"),
    ({"a": None}, r"do\(a\): None is not a number"),
    ({"a": {"value": 1}}, r"do\(a\): \{'value': 1\} is not a number"),
    ({}, "empty intervention"),
]


@pytest.mark.parametrize(("do", "message"), BAD)
@pytest.mark.parametrize("entry", ["counterfactual", "counterfactual_parents"])
def test_bad_interventions_are_clear_errors_and_compute_nothing(dscm, entry, do, message):
    x, pa = torch.zeros(BATCH, 1, 4, 6), torch.full((BATCH, 3), 5.0)
    before = CountingImage.calls
    call = (
        (lambda: dscm.counterfactual(x, pa, do))
        if entry == "counterfactual"
        else (lambda: dscm.counterfactual_parents(pa, do))
    )
    with pytest.raises(InterventionError, match=message):
        call()
    assert CountingImage.calls == before


def test_intervention_errors_are_value_errors_and_user_errors():
    """Callers may catch them as ValueError; the command line prints them without a traceback."""
    from causalimg.errors import CausalImgError

    assert issubclass(InterventionError, ValueError) and issubclass(InterventionError, CausalImgError)


def test_support_edges_and_per_sample_values_are_accepted(dscm):
    pa = torch.full((BATCH, 3), 5.0)
    x_cf, pa_cf = dscm.counterfactual(torch.zeros(BATCH, 1, 4, 6), pa, {"a": torch.tensor([0.0, 10.0, 3.0])})
    assert x_cf.shape == (BATCH, 1, 4, 6) and pa_cf[:, 0].tolist() == [0.0, 10.0, 3.0]
    assert torch.equal(pa_cf[:, 2], pa[:, 2])  # c is no descendant of a: copied exactly


def test_a_variable_without_a_flow_cannot_enter_a_dscm():
    """Every variable has a flow, so do() on a variable without one cannot happen: the DSCM refuses it."""
    transform = VariableTransform(("a", "b"), torch.zeros(2), torch.ones(2))
    with pytest.raises(ConfigError, match=r"missing for \['b'\]"):
        DSCM(SCM({"a": [], "b": ["a"]}), {"a": SplineFlow(0)}, ShiftImage(), transform)
