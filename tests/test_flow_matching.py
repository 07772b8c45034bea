"""The flow-matching image mechanism: contract, solvers, abduction, gradients, shapes, training, configs."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from torch import nn

from causalimg.config.loader import read_config_file, resolve_config_path, validate_config
from causalimg.core.mechanism import Exogenous
from causalimg.errors import ConfigError
from causalimg.mechanisms.flow_matching import (
    EVALUATIONS,
    FlowMatching,
    FlowMatchingConfig,
    causalimg_image_mechanisms,
    resolve,
)
from causalimg.plugins.manager import load_registry
from causalimg.testing import check_image_mechanism

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (16, 48)
PIXEL_255 = 127.5  # [-1, 1] -> 0-255 units


def tiny(shape: tuple[int, int] = SHAPE, num_parents: int = 2, **overrides) -> FlowMatching:
    fields = dict(preset=None, widths=(8, 16), blocks=(1, 1), embed_dim=16)
    torch.manual_seed(0)
    return FlowMatching.from_config(FlowMatchingConfig(**{**fields, **overrides}), image_shape=shape,
                                    num_parents=num_parents)  # fmt: skip


def perturbed(model: FlowMatching, scale: float = 0.05) -> FlowMatching:
    """Zero-initialised convs make an untrained network's velocity exactly 0; perturb them so it is not."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def batch(n: int = 3, shape: tuple[int, int] = SHAPE, num_parents: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, *shape, generator=gen) * 2 - 1, torch.rand(n, num_parents, generator=gen) * 2 - 1


def null_error(model: FlowMatching, x: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
    """|predict(abduct(x, pa), pa) - x| per pixel, (B, 1, H, W) on [-1, 1]."""
    with torch.no_grad():
        return (model.predict(model.abduct(x, pa), pa) - x).abs()


def test_contract_with_a_live_velocity_field() -> None:
    """An ODE abduction of a non-zero field is not exact: at the shipped settings this field's null
    counterfactual is off by about 1e-4 on [-1, 1] (0.01 in 0-255 units), so the test states 1e-3."""
    model = perturbed(tiny())
    with torch.no_grad():
        x, pa = batch()
        assert model.velocity(x, torch.full((3,), 0.5), pa).abs().mean() > 0.05
    check_image_mechanism(model, SHAPE, 2, abduction_tolerance=1e-3)


def test_contract_catches_a_coarse_abduction() -> None:
    """One Euler step without refinement leaves a visible null-counterfactual error; the check sees it."""
    model = perturbed(tiny(solver="euler", steps=1))
    with pytest.raises(AssertionError, match="give back x within 0.001"):
        check_image_mechanism(model, SHAPE, 2, abduction_tolerance=1e-3)


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (8, 8)])
def test_wide_and_tall_shapes(shape: tuple[int, int]) -> None:
    model = perturbed(tiny(shape))
    x, pa = batch(3, shape)
    out = model.loss(x, pa)
    assert set(out) == {"loss"} and out["loss"].shape == (3,) and torch.isfinite(out["loss"]).all()
    with torch.no_grad():
        exo = model.abduct(x, pa)
        assert isinstance(exo, Exogenous) and exo.latents == [] and exo.noise.shape == x.shape
        for image in (model.predict(exo, -pa), model.sample(pa, t=0.8), model.reconstruct(x, pa)):
            assert image.shape == x.shape and image.dtype == torch.float32 and image.abs().max() <= 1
        assert (model.predict(exo, -pa) - model.predict(exo, pa)).abs().max() > 1e-3, "parents reach the pixels"


class LinearField(nn.Module):
    """dx/dt = 2 t c x with c = pa[:, 0], so x(1) = x(0) exp(c): a field with a known flow."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        return 2 * t.reshape(-1, 1, 1, 1) * pa[:, 0].reshape(-1, 1, 1, 1) * x


@pytest.mark.parametrize(
    ("solver", "order", "steps"), [("euler", 1, 8), ("midpoint", 2, 8), ("heun", 2, 8), ("rk4", 4, 4)]
)
def test_solvers_converge_at_their_order(solver: str, order: int, steps: int) -> None:
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    pa = torch.tensor([[1.0], [-1.0], [0.5]])
    exact = x0 * pa.exp().reshape(-1, 1, 1, 1)
    errors = []
    for n in (steps, 2 * steps):
        model = tiny((4, 4), num_parents=1, widths=(8,), blocks=(1,), solver=solver, steps=n)
        model.velocity = LinearField()
        errors.append(float((model.integrate(x0, pa) - exact).abs().max()))
    assert abs(math.log2(errors[0] / errors[1]) - order) < 0.25, errors  # halving h divides the error by 2^order


@pytest.mark.parametrize(("solver", "steps"), [("euler", 8), ("midpoint", 8), ("heun", 8), ("rk4", 4)])
def test_fixed_point_abduction_inverts_the_discrete_solver(solver: str, steps: int) -> None:
    """Plain backward integration misses x0 by the solver's error; refinements invert the forward steps."""
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    pa = torch.tensor([[1.0], [-1.0], [0.5]])
    misses = []
    for iterations in (0, 12):  # each iteration shrinks the miss by about h |dv/dx| <= 2 h
        model = tiny((4, 4), num_parents=1, widths=(8,), blocks=(1,), solver=solver, steps=steps,
                     abduction_iterations=iterations)  # fmt: skip
        model.velocity = LinearField()
        misses.append(float((model.invert(model.integrate(x0, pa), pa) - x0).abs().max()))
    assert misses[1] < 1e-6 and misses[0] > 10 * misses[1], misses  # refined: float32 round-off


@pytest.mark.parametrize("solver", list(EVALUATIONS))
@pytest.mark.parametrize(("steps", "iterations"), [(1, 0), (3, 2)])
def test_solver_step_count_and_iterations_are_respected(solver: str, steps: int, iterations: int) -> None:
    model = perturbed(tiny(solver=solver, steps=steps, abduction_iterations=iterations))
    calls = []
    model.velocity.register_forward_hook(lambda module, args, out: calls.append(float(args[1][0])))
    x, pa = batch()
    with torch.no_grad():
        exo = model.abduct(x, pa)
        abduction = len(calls)
        model.predict(exo, pa)
    assert abduction == EVALUATIONS[solver] * steps * (1 + iterations)
    assert len(calls) - abduction == EVALUATIONS[solver] * steps
    assert len(calls) == model.evaluations_per_counterfactual
    times, grid = calls[abduction:], model._grid()  # prediction: from t = 0 up to t = 1 on the grid
    last = {"euler": grid[-2], "midpoint": (grid[-2] + 1) / 2, "heun": 1.0, "rk4": 1.0}[solver]
    assert times[0] == 0.0 and max(times) == pytest.approx(last)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_time_grid_follows_grid_power(power: float) -> None:
    """Euler evaluates the field at t_k = 1 - (1 - k / N)^p, k < N; p > 1 shortens the steps near t = 1."""
    model = perturbed(tiny(solver="euler", steps=4, grid_power=power))
    calls = []
    model.velocity.register_forward_hook(lambda module, args, out: calls.append(float(args[1][0])))
    x, pa = batch()
    with torch.no_grad():
        model.predict(Exogenous(latents=[], noise=x), pa)
    assert calls == pytest.approx([1 - (1 - k / 4) ** power for k in range(4)])
    steps = [b - a for a, b in zip(model._grid()[:-1], model._grid()[1:])]
    assert steps[-1] < steps[0] if power > 1 else steps[-1] >= steps[0]


def test_gradients_reach_the_velocity_network_through_predict() -> None:
    model = perturbed(tiny(steps=4, differentiable_abduction=False))
    x, pa = batch()
    exo = model.abduct(x, pa)
    assert exo.noise.grad_fn is None, "without differentiable_abduction the noise is a constant to the gradient"
    model.predict(exo, -pa).square().mean().backward()
    named = dict(model.velocity.named_parameters())
    for name in ("stem.weight", "embed.net.0.weight", "down.0.blocks.0.inner.2.weight", "up.0.blocks.0.outer.2.weight",
                 "head.2.weight"):  # fmt: skip
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    differentiable = perturbed(tiny(steps=2))  # the default
    assert differentiable.abduct(x, pa).noise.grad_fn is not None


def test_checkpointing_keeps_one_image_per_step_and_the_same_gradients() -> None:
    """With checkpointing backward keeps each step's input, not its activations; gradients are bit-identical."""
    x, pa = batch()
    saved, grads = {}, {}
    for checkpointing in (True, False):
        model = perturbed(tiny(steps=8, solver="heun", checkpointing=checkpointing))
        exo = model.abduct(x, pa)
        sizes = []

        def pack(t: torch.Tensor, sizes=sizes) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.predict(exo, -pa)
        out.square().mean().backward()
        saved[checkpointing] = sum(sizes)
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in model.parameters()])
    image_bytes = x.numel() * x.element_size()
    assert saved[True] <= (8 + 2) * image_bytes, saved  # 8 steps' inputs and the clamp's
    assert saved[False] > 100 * saved[True], saved
    assert torch.equal(grads[True], grads[False])


def test_sampling_temperature() -> None:
    model = perturbed(tiny())
    _, pa = batch()
    assert torch.equal(model.sample(pa, t=0.0), model.sample(pa, t=0.0)), "t = 0 integrates from x0 = 0"
    assert not torch.equal(model.sample(pa, t=1.0), model.sample(pa, t=1.0))


def band_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16 x 48 images: a bright horizontal band whose thickness is the parent, plus a random blob."""
    thickness = torch.randint(2, 9, (n,), generator=generator)
    rows = torch.arange(16).reshape(1, 16, 1)
    band = (rows - 8).abs() < thickness.reshape(-1, 1, 1) / 2
    centre = torch.randint(6, 42, (n, 1, 1), generator=generator)
    blob = (torch.arange(48).reshape(1, 1, 48) - centre).abs() < 3
    x = torch.where(band, 0.6, torch.where(blob & ~band, 0.2, -1.0))
    pa = ((thickness.float() - 2) / 6 * 2 - 1).reshape(n, 1)
    return x.unsqueeze(1), pa


@pytest.fixture(scope="module")
def trained() -> dict:
    """A tiny velocity network trained 150 steps of 16 band images; its loss before and after on fixed noise."""
    gen = torch.Generator().manual_seed(0)
    x, pa = band_images(128, gen)
    model = tiny(num_parents=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        torch.manual_seed(123)  # the same x0 and t draws before and after training
        with torch.no_grad():
            return float(model.loss(x, pa)["loss"].mean())

    start = held_out_loss()
    for _ in range(150):
        idx = torch.randint(0, 128, (16,), generator=gen)
        opt.zero_grad()
        model.loss(x[idx], pa[idx])["loss"].mean().backward()
        opt.step()
    return {"model": model.eval(), "x": x[:32], "pa": pa[:32], "start": start, "end": held_out_loss()}


@pytest.mark.slow
def test_short_training_lowers_the_loss(trained) -> None:
    # an untrained (v = 0) network's loss is E|x1 - x0|^2 = E[x1^2] + 1
    assert trained["start"] == pytest.approx(float(trained["x"].square().mean()) + 1, abs=0.1)
    assert trained["end"] < 0.6 * trained["start"], (trained["start"], trained["end"])


@pytest.mark.slow
def test_null_counterfactual_of_a_trained_model(trained) -> None:
    """At the shipped settings the null counterfactual is within the issue's bar, 1.0 (mean L1, 0-255;
    0.40 measured on these noiseless two-level images, the stiffest case); one Euler step is far off."""
    model, x, pa = trained["model"], trained["x"], trained["pa"]
    shipped = FlowMatchingConfig()
    model.solver, model.steps, model.grid_power = shipped.solver, shipped.steps, shipped.grid_power
    model.abduction_iterations = shipped.abduction_iterations
    assert float(null_error(model, x, pa).mean()) * PIXEL_255 < 1.0
    model.solver, model.steps, model.grid_power = "euler", 1, 1.0
    assert float(null_error(model, x, pa).mean()) * PIXEL_255 > 10.0  # the learnt flow is far from straight


def test_presets_and_their_sizes() -> None:
    for shape in ((16, 96), (32, 192), (96, 16)):
        model = FlowMatching.from_config(FlowMatchingConfig(), image_shape=shape, num_parents=9)
        assert 1.0 < sum(p.numel() for p in model.parameters()) / 1e6 < 5.0
    arch = resolve(FlowMatchingConfig(preset="paper"), (64, 384))
    assert arch.resolutions[-1] == (4, 24)
    model = FlowMatching(arch, num_parents=9)
    assert 20.0 < sum(p.numel() for p in model.parameters()) / 1e6 < 40.0


@pytest.mark.parametrize(
    ("config", "shape", "message"),
    [
        (dict(), (12, 96), "divisible by 8; 12 x 96 is not"),
        (dict(preset=None, widths=(8, 16)), SHAPE, "flow-matching.blocks is required when preset is null"),
        (dict(widths=(8, 16, 32)), SHAPE, "blocks has 4 entries, widths 3"),
        (dict(embed_dim=15), SHAPE, "embed_dim must be even"),
    ],
)
def test_bad_architectures_are_config_errors(config, shape, message) -> None:
    with pytest.raises(ConfigError, match=message):
        FlowMatching.from_config(FlowMatchingConfig(**config), image_shape=shape, num_parents=2)


def test_bad_values_are_rejected_by_field() -> None:
    with pytest.raises(ConfigError, match="num_parents=0"):
        FlowMatching.from_config(FlowMatchingConfig(), image_shape=(16, 96), num_parents=0)
    for fields, name in [
        (dict(solver="rk45"), "solver"), (dict(steps=0), "steps"), (dict(abduction_iterations=-1), "abduction_iterations"),
        (dict(grid_power=0.0), "grid_power"),
        (dict(widht=(8,)), "widht"), (dict(widths=(8, 0)), "widths"),
    ]:  # fmt: skip
        with pytest.raises(pydantic.ValidationError, match=name):
            FlowMatchingConfig(**fields)


def test_wrong_input_shapes_are_named() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 48\)"):
        model.loss(torch.zeros(2, 1, 48, 16), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model.sample(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no latents"):
        model.predict(Exogenous(latents=[torch.zeros(2, 1)], noise=torch.zeros(2, 1, 16, 48)), torch.zeros(2, 2))


def test_plugin_record_registry_and_run_config() -> None:
    (spec,) = causalimg_image_mechanisms()
    assert spec.name == "flow-matching" and spec.config is FlowMatchingConfig
    registry = load_registry()
    assert registry.get("image_mechanism", "flow-matching").factory == FlowMatching.from_config
    raw = read_config_file(resolve_config_path("tiny"))
    raw["image_mechanism"] = {"name": "flow-matching", "solver": "heun", "steps": 4}
    config = validate_config(raw, registry)
    assert isinstance(config.image_mechanism, FlowMatchingConfig) and config.image_mechanism.solver == "heun"
    with pytest.raises(ConfigError, match="image_mechanism"):
        validate_config({**raw, "image_mechanism": {"name": "flow-matching", "dropout": 0.1}}, registry)


def test_guided_prediction_follows_the_guide_and_is_plain_prediction_without_one() -> None:
    """predict_guided with a flat loss is predict; a loss on the mean intensity moves every image its way,
    more with a larger scale; nothing it returns carries a gradient."""
    from causalimg.core.mechanism import GuidedPrediction

    model = perturbed(tiny(steps=4))
    assert isinstance(model, GuidedPrediction)
    x, pa = batch()
    state = model.abduct(x, pa)
    with torch.no_grad():
        plain = model.predict(state, pa)
    flat = model.predict_guided(state, pa, lambda image: image.sum() * 0.0, scale=10.0)
    assert torch.allclose(flat, plain, atol=1e-6)
    brighter = {s: model.predict_guided(state, pa, lambda image: -image.mean(dim=(1, 2, 3)).sum(), scale=s)
                for s in (1.0, 4.0)}  # fmt: skip
    gain = {s: (image - plain).mean(dim=(1, 2, 3)) for s, image in brighter.items()}  # (B,) per image
    assert (gain[1.0] > 0).all() and (gain[4.0] > gain[1.0]).all()
    assert not brighter[1.0].requires_grad and brighter[1.0].abs().max() <= 1
