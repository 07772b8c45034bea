"""Image mechanism plugin ``hvae``: a top-down hierarchical VAE conditioned on the image's parents.

x := g(z, pa). The encoder reduces x to 1 x 1 through per-stage (h, w) resolutions; the decoder
climbs back from a learned bias with prior p(z | h), posterior q(z | h, enc) and a projection of z
in every stochastic block. Parents are embedded once by an MLP and added inside every decoder
block. Abduction keeps the posterior latents and the deterministic pixel noise u = (x - loc) / scale,
so predicting under the factual parents returns x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

import causalimg
from causalimg.core.mechanism import Exogenous
from causalimg.errors import ConfigError
from causalimg.mechanisms.hvae_blocks import Decoder, DiscretisedGaussian, Encoder
from causalimg.mechanisms.presets import fill_from_preset
from causalimg.plugins.specs import ImageMechanismSpec
from causalimg.strict import StrictModel

Resolution = tuple[int, int]


class HVAEConfig(StrictModel):
    """HVAE architecture. Fields left ``None`` come from ``preset``; per-stage tuples run from the
    input resolution down to 1 x 1 (one entry per resolution, i.e. stages + 1)."""

    name: Literal["hvae"] = "hvae"
    preset: Literal["cpu", "paper"] | None = "cpu"
    widths: tuple[PositiveInt, ...] | None = Field(None, min_length=1)
    enc_blocks: tuple[PositiveInt, ...] | None = Field(None, min_length=1)
    dec_blocks: tuple[PositiveInt, ...] | None = Field(None, min_length=1)
    # (fh, fw) per downsampling stage; None: halve both sides while they are even and > 1, then pool to 1 x 1
    stage_factors: tuple[tuple[PositiveInt, PositiveInt], ...] | None = Field(None, min_length=1)
    bottleneck: PositiveFloat | None = None  # inner width of every block = width * bottleneck
    z_dim: PositiveInt | None = None  # latent channels per stochastic block
    # latent max resolution, counted in stages from 1 x 1 upwards (None: every stage but the input's)
    latent_stages: PositiveInt | None = None
    embed_dim: PositiveInt | None = None  # parent embedding width
    beta: PositiveFloat = 1.0  # nelbo = nll + beta * kl
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    checkpointing: bool = False  # recompute activations in backward: less memory, same numbers

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"checkpointing"})


@dataclass(frozen=True)
class Architecture:
    """A fully resolved HVAE shape; per-stage tuples run from the input resolution down."""

    resolutions: tuple[Resolution, ...]
    widths: tuple[int, ...]
    enc_blocks: tuple[int, ...]
    dec_blocks: tuple[int, ...]
    bottleneck: float
    z_dim: int
    latent_stages: int
    embed_dim: int


# The paper preset reproduces the capacity of the published HVAE at the paper's two input sizes
# (32 x 192: 7 resolutions; 64 x 384: 8 resolutions); the cpu preset is a few M parameters.
_PAPER = {
    7: dict(
        widths=(32, 64, 96, 128, 160, 192, 512), enc_blocks=(2, 4, 8, 12, 8, 2, 2),
        dec_blocks=(2, 4, 8, 12, 12, 8, 2), bottleneck=0.405, z_dim=16, embed_dim=256,
    ),
    8: dict(
        widths=(32, 64, 96, 128, 160, 160, 192, 512), enc_blocks=(2, 4, 8, 12, 8, 4, 3, 2),
        dec_blocks=(2, 4, 8, 12, 16, 12, 6, 3), bottleneck=0.395, z_dim=16, embed_dim=256,
    ),
}  # fmt: skip
_CPU_WIDTHS = (16, 32, 64, 96, 128, 128, 128, 128, 128, 128)
_CPU_ENC = (1, 1, 1, 2, 2, 1, 1, 1, 1, 1)
_CPU_DEC = (1, 1, 2, 2, 2, 1, 1, 1, 1, 1)


def stage_resolutions(image_shape: Resolution, factors=None) -> tuple[Resolution, ...]:
    """Per-stage (h, w) from the input down to 1 x 1; a factor that does not divide is a ConfigError."""
    h, w = image_shape
    if factors is None:
        factors = []
        while h > 1 and w > 1 and h % 2 == 0 and w % 2 == 0:
            factors.append((2, 2))
            h, w = h // 2, w // 2
        if (h, w) != (1, 1):
            factors.append((h, w))
        h, w = image_shape
    out = [(h, w)]
    for fh, fw in factors:
        if h % fh or w % fw:
            raise ConfigError(
                f"hvae.stage_factors: ({fh}, {fw}) does not divide the {h} x {w} stage of a {image_shape[0]} x {image_shape[1]} image"
            )
        h, w = h // fh, w // fw
        out.append((h, w))
    if out[-1] != (1, 1):
        raise ConfigError(f"hvae.stage_factors: {image_shape[0]} x {image_shape[1]} ends at {h} x {w}, not 1 x 1")
    return tuple(out)


def resolve(config: HVAEConfig, image_shape: Resolution) -> Architecture:
    """Fill unset fields from the preset and check every per-stage tuple against the image's stages."""
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ConfigError(f"hvae: image_shape must be (H, W) with positive sides, got {image_shape}")
    resolutions = stage_resolutions((image_shape[0], image_shape[1]), config.stage_factors)
    n = len(resolutions)
    if config.preset == "paper":
        if n not in _PAPER:
            raise ConfigError(
                f"hvae.preset 'paper' is defined for 7 or 8 resolutions (32 x 192, 64 x 384); "
                f"{image_shape[0]} x {image_shape[1]} has {n}: set widths/enc_blocks/dec_blocks explicitly"
            )
        preset = dict(_PAPER[n])
    elif config.preset == "cpu":
        if n > len(_CPU_WIDTHS):
            raise ConfigError(f"hvae.preset 'cpu' covers up to {len(_CPU_WIDTHS)} resolutions; {image_shape} has {n}")
        preset = dict(widths=_CPU_WIDTHS[:n], enc_blocks=_CPU_ENC[:n], dec_blocks=_CPU_DEC[:n],
                      bottleneck=0.5, z_dim=8, embed_dim=64)  # fmt: skip
    else:
        preset = {}
    keys = ("widths", "enc_blocks", "dec_blocks", "bottleneck", "z_dim", "embed_dim")
    fields = fill_from_preset(config, preset, keys, "hvae")
    names = " -> ".join(f"{h}x{w}" for h, w in resolutions)
    for key in ("widths", "enc_blocks", "dec_blocks"):
        if len(fields[key]) != n:
            raise ConfigError(f"hvae.{key} has {len(fields[key])} entries; the {n} resolutions are {names}")
    latent_stages = config.latent_stages if config.latent_stages is not None else max(n - 1, 1)
    if latent_stages > n:
        raise ConfigError(f"hvae.latent_stages={latent_stages} exceeds the {n} resolutions {names}")
    return Architecture(resolutions, latent_stages=latent_stages, **fields)


class HVAE(nn.Module):
    """Hierarchical VAE image mechanism; images (B, 1, H, W) in [-1, 1], parents (B, P) normalised."""

    def __init__(
        self,
        arch: Architecture,
        num_parents: int,
        *,
        beta: float = 1.0,
        dropout: float = 0.1,
        checkpointing: bool = False,
    ):
        super().__init__()
        if num_parents < 1:
            raise ConfigError(f"hvae: the image needs at least one parent, got num_parents={num_parents}")
        self.arch, self.beta, self.num_parents = arch, beta, num_parents
        self.image_shape = arch.resolutions[0]
        self.embed = nn.Sequential(
            nn.Linear(num_parents, arch.embed_dim), nn.SiLU(), nn.Linear(arch.embed_dim, arch.embed_dim), nn.SiLU()
        )
        self.encoder = Encoder(arch.resolutions, arch.widths, arch.enc_blocks, arch.bottleneck, dropout, checkpointing)
        self.decoder = Decoder(
            arch.resolutions[::-1], arch.widths[::-1], arch.dec_blocks[::-1], arch.latent_stages,
            arch.z_dim, arch.embed_dim, arch.bottleneck, dropout, checkpointing,
        )  # fmt: skip
        self.likelihood = DiscretisedGaussian(arch.widths[0])

    @classmethod
    def from_config(cls, config: HVAEConfig, *, image_shape: tuple[int, int], num_parents: int) -> HVAE:
        arch = resolve(config, image_shape)
        return cls(arch, num_parents, beta=config.beta, dropout=config.dropout, checkpointing=config.checkpointing)

    def _check(self, x: torch.Tensor | None, pa: torch.Tensor) -> None:
        if pa.ndim != 2 or pa.shape[1] != self.num_parents:
            raise ValueError(f"hvae: parents must be (B, {self.num_parents}), got {tuple(pa.shape)}")
        if x is not None and (x.ndim != 4 or tuple(x.shape[1:]) != (1, *self.image_shape)):
            raise ValueError(
                f"hvae: images must be (B, 1, {self.image_shape[0]}, {self.image_shape[1]}), got {tuple(x.shape)}"
            )

    def _decode(self, pa, x=None, latents=None, t=1.0, acts=None):
        """-> (loc, log_scale (B, 1, H, W) float32, KL terms, latents); ``acts``: encoder activations already computed."""
        if acts is None and x is not None:
            acts = self.encoder(x)[::-1]  # lowest resolution first, as the decoder climbs
        h, kls, zs = self.decoder(self.embed(pa), acts, latents, t)
        loc, log_scale = self.likelihood(h)
        return loc, log_scale, kls, zs

    def _nelbo(self, x, loc, log_scale, kls) -> dict[str, torch.Tensor]:
        pixels = x[0].numel()
        nll = DiscretisedGaussian.nll(x.float(), loc, log_scale).flatten(1).mean(1)
        kl = sum(k.flatten(1).sum(1) for k in kls) / pixels if kls else torch.zeros_like(nll)
        nelbo = nll + self.beta * kl
        return {"loss": nelbo, "nelbo": nelbo, "nll": nll, "kl": kl}

    def loss(self, x: torch.Tensor, pa: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image (B,) ``loss`` = ``nelbo`` = nll + beta * kl, each in nats per pixel."""
        self._check(x, pa)
        loc, log_scale, kls, _ = self._decode(pa, x=x)
        return self._nelbo(x, loc, log_scale, kls)

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, t: float = 0.0) -> Exogenous:
        """Posterior latents (noise scaled by t) and pixel noise u = (x - loc) / scale under pa."""
        self._check(x, pa)
        loc, log_scale, _, zs = self._decode(pa, x=x, t=t)
        return Exogenous(latents=zs, noise=(x.float() - loc) / log_scale.exp())

    def loss_and_abduct(
        self, x: torch.Tensor, pa: torch.Tensor, t: float = 0.0
    ) -> tuple[dict[str, torch.Tensor], Exogenous]:
        """``loss(x, pa)`` and ``abduct(x, pa, t)`` from ONE encoder pass (fine-tuning needs both).

        Both condition their decoder on the same bottom-up activations of the same x, so the encoder
        runs once (forward and backward): the same values as the two calls in eval mode; in training
        the two share the encoder's dropout draw instead of drawing twice (the same expected loss).
        """
        self._check(x, pa)
        acts = self.encoder(x)[::-1]
        loc, log_scale, kls, _ = self._decode(pa, t=1.0, acts=acts)
        factual = self._nelbo(x, loc, log_scale, kls)
        loc, log_scale, _, zs = self._decode(pa, t=t, acts=acts)
        return factual, Exogenous(latents=zs, noise=(x.float() - loc) / log_scale.exp())

    def predict(self, exogenous: Exogenous, pa: torch.Tensor) -> torch.Tensor:
        """clamp(loc + scale * u, -1, 1) decoded from the abducted latents under parents pa."""
        self._check(None, pa)
        expected = sum(n for i, n in enumerate(self.arch.dec_blocks[::-1]) if i < self.arch.latent_stages)
        if len(exogenous.latents) != expected:
            raise ValueError(f"hvae: expected {expected} abducted latents, got {len(exogenous.latents)}")
        loc, log_scale, _, _ = self._decode(pa, latents=exogenous.latents)
        return (loc + log_scale.exp() * exogenous.noise).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, pa: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """Latents from the prior at temperature t; returns the decoded mean image, clamped."""
        self._check(None, pa)
        loc, _, _, _ = self._decode(pa, t=t)
        return loc.clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """The decoded mean from posterior-mean latents (no pixel noise): what the model 'sees' in x."""
        self._check(x, pa)
        loc, _, _, _ = self._decode(pa, x=x, t=0.0)
        return loc.clamp(-1, 1)


@causalimg.hookimpl
def causalimg_image_mechanisms() -> list[ImageMechanismSpec]:
    return [
        ImageMechanismSpec(
            name="hvae",
            config=HVAEConfig,
            factory=HVAE.from_config,
            summary="Top-down hierarchical VAE conditioned on parents (cpu and paper presets)",
        )
    ]
