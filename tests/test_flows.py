"""The spline-flow attribute mechanism: exact inversion, maximum-likelihood fitting, plugin record."""

from __future__ import annotations

import math

import pytest
import torch

from causalimg.mechanisms.flows import SplineFlow, SplineFlowConfig, causalimg_attribute_mechanisms

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("num_context", [0, 2])
def test_inverse_of_forward_is_identity(num_context: int) -> None:
    torch.manual_seed(0)
    flow = SplineFlow(num_context).double()
    with torch.no_grad():  # a non-trivial flow: random hyper-network outputs, not the near-identity init
        for p in flow.parameters():
            p.normal_(0, 0.5)
    u = torch.randn(256, 1, dtype=torch.float64) * 1.5
    c = torch.randn(256, num_context, dtype=torch.float64) if num_context else None
    v = flow.forward_map(u, c)
    assert v.shape == (256, 1)
    assert (v - u).abs().max() > 1e-2  # the map is not the identity
    torch.testing.assert_close(flow.inverse_map(v, c), u, atol=1e-5, rtol=0)


def test_root_flow_rejects_context_and_conditional_flow_requires_it() -> None:
    with pytest.raises(ValueError, match="no context"):
        SplineFlow(0).log_prob(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        SplineFlow(2).log_prob(torch.zeros(3, 1), None)


def test_fitting_improves_likelihood_over_standard_normal() -> None:
    """Maximum likelihood on a skewed, bounded variable beats N(0, 1) on held-out data."""
    torch.manual_seed(0)
    data = torch.distributions.Beta(2.0, 5.0).sample((4096, 1)) * 2 - 1  # normalised to [-1, 1]
    train, test = data[:3072], data[3072:]
    flow = SplineFlow(0)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = -flow.log_prob(train[torch.randint(0, 3072, (256,))], None).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fitted = flow.log_prob(test, None).mean().item()
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(test).mean().item()
    assert fitted > normal + 0.5, (fitted, normal)
    assert math.isfinite(fitted)


def test_plugin_record_builds_from_config() -> None:
    (spec,) = causalimg_attribute_mechanisms()
    assert spec.name == "spline-flow" and spec.config is SplineFlowConfig
    flow = spec.factory(SplineFlowConfig(transforms=2, hidden=(16,)), num_context=1)
    assert flow.log_prob(torch.zeros(4, 1), torch.zeros(4, 1)).shape == (4,)
