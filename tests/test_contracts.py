"""The contract checks of causalimg.testing: every registered mechanism passes, broken ones fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalimg.plugins.manager import load_registry
from causalimg.testing import check_attribute_mechanism, check_image_mechanism

REGISTRY = load_registry()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", REGISTRY.names("image_mechanism"))
def test_every_image_mechanism_meets_the_contract(name: str) -> None:
    spec = REGISTRY.get("image_mechanism", name)
    torch.manual_seed(0)
    mechanism = spec.factory(spec.config(), image_shape=(16, 96), num_parents=9)
    check_image_mechanism(mechanism, (16, 96), 9)


@pytest.mark.parametrize("num_context", [0, 2])
@pytest.mark.parametrize("name", REGISTRY.names("attribute_mechanism"))
def test_every_attribute_mechanism_meets_the_contract(name: str, num_context: int) -> None:
    spec = REGISTRY.get("attribute_mechanism", name)
    torch.manual_seed(0)
    check_attribute_mechanism(spec.factory(spec.config(), num_context=num_context), num_context)


class ForgetsNoise(nn.Module):
    """Wraps a real mechanism but predicts without the abducted pixel noise: not exact."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def loss(self, x, pa):
        return self.inner.loss(x, pa)

    def abduct(self, x, pa, t=0.0):
        return self.inner.abduct(x, pa, t)

    def predict(self, exogenous, pa):
        return self.inner.reconstruct(torch.zeros(pa.shape[0], 1, 16, 96), pa)

    def sample(self, pa, t=1.0):
        return self.inner.sample(pa, t)


class LossyInverse(nn.Module):
    """A map whose inverse is off by 1e-3: abduction would not be exact."""

    def forward_map(self, u, context):
        return 2 * u

    def inverse_map(self, v, context):
        return v / 2 + 1e-3

    def log_prob(self, v, context):
        return -0.5 * (v / 2).pow(2).sum(1)


def test_the_checks_catch_broken_mechanisms() -> None:
    spec = REGISTRY.get("image_mechanism", "hvae")
    torch.manual_seed(0)
    real = spec.factory(spec.config(), image_shape=(16, 96), num_parents=9)
    with pytest.raises(AssertionError, match="give back x"):
        check_image_mechanism(ForgetsNoise(real), (16, 96), 9)
    with pytest.raises(AssertionError, match="give back u"):
        check_attribute_mechanism(LossyInverse(), 0)
