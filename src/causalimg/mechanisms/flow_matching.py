"""Image mechanism plugin ``flow-matching``: x := g(x0, pa), the flow of a conditional velocity field.

Training is conditional flow matching on rectified-flow paths x_t = (1 - t) x0 + t x1, with
x0 ~ N(0, I) and x1 the image in [-1, 1]: the network v(x_t, t, pa) regresses the path's velocity
x1 - x0. The mechanism is the ODE dx/dt = v(x, t, pa) from t = 0 to t = 1. Abduction integrates it
backwards from the image under the factual parents to its noise x0 (deterministic); prediction
integrates forwards from x0 under the counterfactual parents. A fixed-step explicit solver (euler,
midpoint, heun, rk4) with ``steps`` steps does both, on a time grid whose steps shrink towards
t = 1 (``grid_power``), where a field learnt from images is stiff; ``abduction_iterations``
fixed-point refinements per step can make abduction invert the prediction's discrete steps rather
than only the ODE. Prediction is differentiable with activation checkpointing per solver step, so
memory holds one step's activations whatever the step count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn
from torch.utils.checkpoint import checkpoint

import causalimg
from causalimg.core.mechanism import Exogenous
from causalimg.errors import ConfigError
from causalimg.mechanisms.flow_matching_blocks import VelocityUNet
from causalimg.mechanisms.presets import fill_from_preset
from causalimg.plugins.specs import ImageMechanismSpec
from causalimg.strict import StrictModel

Resolution = tuple[int, int]
Solver = Literal["euler", "midpoint", "heun", "rk4"]
Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x (B, 1, H, W), t) -> dx/dt


class FlowMatchingConfig(StrictModel):
    """Velocity U-Net and ODE solver. Fields left ``None`` come from ``preset``; per-level tuples
    run from the input resolution down (each level halves both sides)."""

    name: Literal["flow-matching"] = "flow-matching"
    preset: Literal["cpu", "paper"] | None = "cpu"
    widths: tuple[PositiveInt, ...] | None = Field(None, min_length=1)  # channels per U-Net level
    blocks: tuple[PositiveInt, ...] | None = Field(
        None, min_length=1
    )  # residual blocks per level, down and up path each
    embed_dim: PositiveInt | None = None  # width of the joint (time, parents) embedding
    solver: Solver = "rk4"
    steps: PositiveInt = 4  # solver steps from t = 0 to t = 1, for abduction, prediction and sampling
    # time grid t_k = 1 - (1 - k / steps)^grid_power: > 1 packs steps towards t = 1, where the field is stiff
    grid_power: PositiveFloat = 2.0
    abduction_iterations: NonNegativeInt = 0  # fixed-point refinements per abduction step
    # recompute each solver step in backward: memory of one step for one more forward pass, same numbers
    checkpointing: bool = True
    # True: fine-tuning differentiates abduction too; False: the abducted noise is a constant to the
    # gradient (cheaper, but it credits parent-independent changes that abduction then undoes)
    differentiable_abduction: bool = True

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"checkpointing"})


@dataclass(frozen=True)
class Architecture:
    """A fully resolved velocity U-Net; per-level tuples run from the input resolution down."""

    resolutions: tuple[Resolution, ...]
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    embed_dim: int


_PRESETS = {
    "cpu": dict(widths=(16, 32, 64, 128), blocks=(1, 1, 2, 2), embed_dim=128),
    "paper": dict(widths=(64, 128, 192, 256, 384), blocks=(2, 2, 2, 2, 2), embed_dim=256),
}
# network evaluations per solver step
EVALUATIONS: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def level_resolutions(image_shape: Resolution, levels: int) -> tuple[Resolution, ...]:
    """(h, w) per U-Net level, halving both sides; a side not divisible by 2^(levels - 1) is a ConfigError."""
    h, w = image_shape
    factor = 2 ** (levels - 1)
    if h % factor or w % factor:
        raise ConfigError(
            f"flow-matching.widths: {levels} levels halve the image {levels - 1} times, so both sides must be "
            f"divisible by {factor}; {h} x {w} is not"
        )
    return tuple((h // 2**i, w // 2**i) for i in range(levels))


def resolve(config: FlowMatchingConfig, image_shape: Resolution) -> Architecture:
    """Fill unset fields from the preset and check the per-level tuples against each other and the image."""
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ConfigError(f"flow-matching: image_shape must be (H, W) with positive sides, got {image_shape}")
    preset = _PRESETS[config.preset] if config.preset is not None else {}
    fields = fill_from_preset(config, preset, ("widths", "blocks", "embed_dim"), "flow-matching")
    if len(fields["blocks"]) != len(fields["widths"]):
        raise ConfigError(
            f"flow-matching.blocks has {len(fields['blocks'])} entries, widths {len(fields['widths'])}: one per level"
        )
    if fields["embed_dim"] % 2:
        raise ConfigError(f"flow-matching.embed_dim must be even (sine and cosine halves), got {fields['embed_dim']}")
    return Architecture(level_resolutions((image_shape[0], image_shape[1]), len(fields["widths"])), **fields)


# -- fixed-step explicit solvers: x(t + h) = x + h * increment(v, x, t, h) --------------------------
def _euler(v: Velocity, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    return v(x, t)


def _midpoint(v: Velocity, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    return v(x + h / 2 * v(x, t), t + h / 2)


def _heun(v: Velocity, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    k1 = v(x, t)
    return (k1 + v(x + h * k1, t + h)) / 2


def _rk4(v: Velocity, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t + h / 2)
    k3 = v(x + h / 2 * k2, t + h / 2)
    k4 = v(x + h * k3, t + h)
    return (k1 + 2 * k2 + 2 * k3 + k4) / 6


INCREMENTS: dict[str, Callable[[Velocity, torch.Tensor, float, float], torch.Tensor]] = {
    "euler": _euler, "midpoint": _midpoint, "heun": _heun, "rk4": _rk4,
}  # fmt: skip


class FlowMatching(nn.Module):
    """Conditional flow-matching image mechanism; images (B, 1, H, W) in [-1, 1], parents (B, P) normalised."""

    def __init__(
        self,
        arch: Architecture,
        num_parents: int,
        *,
        solver: Solver = "rk4",
        steps: int = 8,
        grid_power: float = 1.0,
        abduction_iterations: int = 0,
        checkpointing: bool = True,
        differentiable_abduction: bool = True,
    ):
        super().__init__()
        if num_parents < 1:
            raise ConfigError(f"flow-matching: the image needs at least one parent, got num_parents={num_parents}")
        if solver not in INCREMENTS:
            raise ConfigError(f"flow-matching.solver: {solver!r} is not one of {', '.join(INCREMENTS)}")
        if steps < 1 or abduction_iterations < 0 or grid_power <= 0:
            raise ConfigError(f"flow-matching: steps must be >= 1, abduction_iterations >= 0 and grid_power > 0, "
                              f"got {steps}, {abduction_iterations}, {grid_power}")  # fmt: skip
        self.arch, self.num_parents = arch, num_parents
        self.image_shape = arch.resolutions[0]
        self.solver, self.steps, self.abduction_iterations = solver, steps, abduction_iterations
        self.grid_power = grid_power
        self.checkpointing, self.differentiable_abduction = checkpointing, differentiable_abduction
        self.velocity = VelocityUNet(arch.resolutions, arch.widths, arch.blocks, num_parents, arch.embed_dim)

    @classmethod
    def from_config(cls, config: FlowMatchingConfig, *, image_shape: tuple[int, int], num_parents: int) -> FlowMatching:
        return cls(
            resolve(config, image_shape), num_parents, solver=config.solver, steps=config.steps, grid_power=config.grid_power,
            abduction_iterations=config.abduction_iterations, checkpointing=config.checkpointing,
            differentiable_abduction=config.differentiable_abduction,
        )  # fmt: skip

    @property
    def evaluations_per_counterfactual(self) -> int:
        """Velocity-network forward passes of one abduction plus one prediction."""
        per_step = EVALUATIONS[self.solver]
        return per_step * self.steps * (2 + self.abduction_iterations)

    def _check(self, x: torch.Tensor | None, pa: torch.Tensor) -> None:
        if pa.ndim != 2 or pa.shape[1] != self.num_parents:
            raise ValueError(f"flow-matching: parents must be (B, {self.num_parents}), got {tuple(pa.shape)}")
        if x is not None and (x.ndim != 4 or tuple(x.shape[1:]) != (1, *self.image_shape)):
            h, w = self.image_shape
            raise ValueError(f"flow-matching: images must be (B, 1, {h}, {w}), got {tuple(x.shape)}")

    def _field(self, pa: torch.Tensor) -> Velocity:
        """v(., ., pa) as a function of (x, t), computed in the network's dtype and returned in float32."""

        def v(x: torch.Tensor, t: float) -> torch.Tensor:
            return self.velocity(x, torch.full((x.shape[0],), t, device=x.device), pa).float()

        return v

    def loss(self, x: torch.Tensor, pa: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image (B,) ``loss`` = mean over pixels of |v(x_t, t, pa) - (x1 - x0)|^2.

        t is stratified over the batch (one draw in each of B equal bins, bins shuffled): every image's
        t is uniform on [0, 1] and the batch mean has less variance than with independent draws.
        """
        self._check(x, pa)
        x1 = x.float()
        batch = x1.shape[0]
        x0 = torch.randn_like(x1)
        t = (torch.randperm(batch, device=x1.device) + torch.rand(batch, device=x1.device)) / batch  # (B,)
        t_ = t.reshape(batch, 1, 1, 1)
        xt = (1 - t_) * x0 + t_ * x1  # (B, 1, H, W)
        error = self.velocity(xt, t, pa).float() - (x1 - x0)
        return {"loss": error.square().flatten(1).mean(1)}

    def _grid(self) -> list[float]:
        """t_k = 1 - (1 - k / N)^p, k = 0..N: uniform for p = 1, steps shrinking towards t = 1 for p > 1."""
        return [1 - (1 - k / self.steps) ** self.grid_power for k in range(self.steps + 1)]

    def _forward_step(self, pa: torch.Tensor, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
        """x(t + h) = x + h * increment(x, t, h)."""
        return x + h * INCREMENTS[self.solver](self._field(pa), x, t, h)

    def _inverse_step(self, pa: torch.Tensor, y: torch.Tensor, t: float, h: float) -> torch.Tensor:
        """x(t) from y = x(t + h): the step integrated backwards from y, then refined by the fixed-point
        iteration x <- y - h * increment(x, t, h), whose fixed point the forward step maps exactly to y."""
        v, increment = self._field(pa), INCREMENTS[self.solver]
        x = y - h * increment(v, y, t + h, -h)
        for _ in range(self.abduction_iterations):
            x = y - h * increment(v, x, t, h)
        return x

    def _run(self, step, pa: torch.Tensor, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
        """One solver step; with gradients and ``checkpointing`` its activations are recomputed in backward."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(step, pa, x, t, h, use_reentrant=False)
        return step(pa, x, t, h)

    def integrate(self, x0: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """x(1) from x(0) = x0 (B, 1, H, W) under parents pa, unclamped, float32."""
        x, grid = x0.float(), self._grid()
        for t, t_next in pairwise(grid):
            x = self._run(self._forward_step, pa, x, t, t_next - t)
        return x

    def invert(self, x1: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """x(0) from x(1) = x1 under parents pa, step by step from the top of the grid down, float32."""
        x, grid = x1.float(), self._grid()
        for t_next, t in pairwise(grid[::-1]):
            x = self._run(self._inverse_step, pa, x, t, t_next - t)
        return x

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, t: float = 0.0) -> Exogenous:
        """The noise x0 (in ``Exogenous.noise``, no latents) that the ODE carries to x under pa.

        Deterministic: ``t`` (the HVAE's posterior temperature) has nothing to scale here. With
        ``differentiable_abduction`` (default) fine-tuning backpropagates through it: abduction and
        prediction share the velocity network, and a change that does not depend on the parents is
        undone by the abduction it also changes, which only the full gradient sees. Without it the
        noise is a constant of the counterfactual, and the gradient goes through the prediction alone.
        """
        self._check(x, pa)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable_abduction):
            x0 = self.invert(x, pa)
        return Exogenous(latents=[], noise=x0)

    def predict(self, exogenous: Exogenous, pa: torch.Tensor) -> torch.Tensor:
        """clamp(x(1), -1, 1) integrated from the abducted noise under parents pa; differentiable."""
        self._check(exogenous.noise, pa)
        if exogenous.latents:
            raise ValueError(f"flow-matching: abducted state has no latents, got {len(exogenous.latents)}")
        return self.integrate(exogenous.noise, pa).clamp(-1, 1)

    def predict_guided(
        self, exogenous: Exogenous, pa: torch.Tensor, guide: Callable[[torch.Tensor], torch.Tensor], scale: float
    ) -> torch.Tensor:
        """``predict`` under the guided field v(x, t) - scale * grad_x guide(x + (1 - t) v(x, t)).

        x + (1 - t) v is where a straight path from x at t ends: the image the step heads for, which
        the guidance loss (e.g. a frozen segmentor's regional areas against the targets) can judge
        (classifier guidance for flows). Each network evaluation then costs a forward and a backward
        pass of the velocity network and the guide; no gradient leaves this function.
        """
        self._check(exogenous.noise, pa)
        field = self._field(pa)

        def guided(x: torch.Tensor, t: float) -> torch.Tensor:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = field(x, t)
                (gradient,) = torch.autograd.grad(guide((x + (1 - t) * v).clamp(-1, 1)), x)
            return v.detach() - scale * gradient

        x, increment = exogenous.noise.float().detach(), INCREMENTS[self.solver]
        for t, t_next in pairwise(self._grid()):
            x = (x + (t_next - t) * increment(guided, x, t, t_next - t)).detach()
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, pa: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """Integrated from noise t * N(0, I) under parents pa, clamped."""
        self._check(None, pa)
        x0 = t * torch.randn(pa.shape[0], 1, *self.image_shape, device=pa.device)
        return self.integrate(x0, pa).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """The null counterfactual predict(abduct(x, pa), pa): the pipeline's reconstruction picture."""
        return self.predict(self.abduct(x, pa), pa)


@causalimg.hookimpl
def causalimg_image_mechanisms() -> list[ImageMechanismSpec]:
    return [
        ImageMechanismSpec(
            name="flow-matching",
            config=FlowMatchingConfig,
            factory=FlowMatching.from_config,
            summary="Conditional flow matching on rectified-flow paths; ODE abduction and prediction (cpu and paper presets)",
        )
    ]
