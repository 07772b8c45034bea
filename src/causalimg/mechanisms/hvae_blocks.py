"""Building blocks of the hierarchical VAE: residual blocks, encoder, top-down decoder, likelihood.

Resolutions are (h, w) pairs per stage, so wide and tall images work alike: every resize names
its target size explicitly instead of deriving one side from the other.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from causalimg.core.likelihood import discretised_gaussian_nll

LOG_SCALE_MIN = -9.0  # pixel log-scale floor of the discretised Gaussian
SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(0 + SOFTPLUS_ONE) = 1: zero-initialised nets give unit scales


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that computes a one-group norm of a narrow channels_last map as a layer norm.

    With one group the statistics run over the whole (C, H, W) sample, which channels_last stores as
    one contiguous (H, W, C) row: torch's layer norm reduces it at full vector width, while its
    channels_last group norm vectorises over channels and, with fewer than 32 of them, is 3-4x
    slower (forward + backward, bf16, 32 x 192 maps). Same statistics, same per-channel affine.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape if x.dim() == 4 else (0, 0, 0, 0)
        if self.num_groups == 1 and c < 32 and x.is_contiguous(memory_format=torch.channels_last) and h * w > 1:
            rows = rearrange(x, "b c h w -> b h w c")  # a view: channels_last memory is (B, H, W, C)
            weight, bias = (p.expand(h, w, c) for p in (self.weight, self.bias))
            return rearrange(F.layer_norm(rows, (h, w, c), weight, bias, self.eps), "b h w c -> b c h w")
        return super().forward(x)


def group_norm(channels: int) -> GroupNorm:
    """Groups of >= 8 channels: a per-channel parent embedding added before the norm survives it
    (with one channel per group the norm would subtract it away entirely)."""
    return GroupNorm(math.gcd(channels, max(1, channels // 8)), channels)


def conv(c_in: int, c_out: int, kernel: int, zero: bool = False) -> nn.Conv2d:
    layer = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    if zero:  # residual branches start as the identity; priors start as N(0, 1)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)  # type: ignore[arg-type]  # a conv made with a bias
    return layer


def kernel_for(resolution: tuple[int, int]) -> int:
    """3 x 3 convolutions except at 1 x 1, where only the centre tap would ever see data."""
    return 1 if resolution == (1, 1) else 3


class Dropout(nn.Module):
    """Inverted dropout drawing its mask from 15-bit integers, in the input's memory layout.

    About 3x faster forward + backward than ``nn.Dropout`` on CPU (whose ``bernoulli_`` was 7% of
    a paper-preset training step); the drop probability is ``p`` rounded to a multiple of 1/32768.
    """

    def __init__(self, p: float):
        super().__init__()
        self.threshold = round(p * 32768)  # int16 random_() is uniform on [0, 32767]
        self.scale = 1 / (1 - self.threshold / 32768) if self.threshold < 32768 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        keep = torch.empty_like(x, dtype=torch.int16).random_() >= self.threshold
        return torch.where(keep, x * self.scale, 0)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a zero-initialised last conv, plus a (1 x 1) skip if widths differ."""

    def __init__(self, c_in: int, c_out: int, c_mid: int, kernel: int, dropout: float):
        super().__init__()
        self.branch = nn.Sequential(
            group_norm(c_in), nn.SiLU(), conv(c_in, c_mid, kernel),
            group_norm(c_mid), nn.SiLU(), Dropout(dropout), conv(c_mid, c_out, kernel, zero=True),
        )  # fmt: skip
        self.skip = nn.Identity() if c_in == c_out else conv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.branch(x)


def _maybe_checkpoint(enabled: bool, fn, *args):
    """Activation checkpointing: same numbers (RNG state is replayed), activations recomputed in backward."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Encoder(nn.Module):
    """Stem then residual stages, average-pooled between stages down to the last (1 x 1) resolution."""

    def __init__(self, resolutions, widths, blocks, mid_ratio: float, dropout: float, checkpointing: bool):
        super().__init__()
        self.resolutions = list(resolutions)
        self.checkpointing = checkpointing
        self.stem = conv(1, widths[0], 3)
        self.stages = nn.ModuleList()
        for i, (res, width, n) in enumerate(zip(resolutions, widths, blocks)):
            c_in = widths[max(i - 1, 0)]
            self.stages.append(
                nn.ModuleList(
                    ResBlock(c_in if j == 0 else width, width, _mid(width, mid_ratio), kernel_for(res), dropout)
                    for j in range(n)
                )
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 1, H, W) -> one activation per stage, (B, C_s, h_s, w_s), input resolution first."""
        h = self.stem(x)
        acts = []
        for i, stage in enumerate(self.stages):
            if i:
                h = F.adaptive_avg_pool2d(h, self.resolutions[i])  # exact average: sizes divide
            for block in cast(nn.ModuleList, stage):
                h = _maybe_checkpoint(self.checkpointing, block, h)
            acts.append(h)
        return acts


def gaussian_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """KL(N(q_loc, q_scale) || N(p_loc, p_scale)) elementwise, in float32."""
    q_loc, q_scale, p_loc, p_scale = (t.float() for t in (q_loc, q_scale, p_loc, p_scale))
    return torch.log(p_scale / q_scale) + (q_scale**2 + (q_loc - p_loc) ** 2) / (2 * p_scale**2) - 0.5


class DecoderBlock(nn.Module):
    """One top-down step: h += embed(pa); prior p(z | h); posterior q(z | h, enc); h += proj(z); res block.

    A deterministic block (above the latent resolutions) keeps only the embedding and the res block.
    """

    def __init__(self, width: int, z_dim: int, embed_dim: int, mid: int, kernel: int, stochastic: bool, dropout: float):
        super().__init__()
        self.z_dim, self.stochastic = z_dim, stochastic
        self.embed = nn.Linear(embed_dim, width)
        if stochastic:
            self.prior = nn.Sequential(
                group_norm(width), nn.SiLU(), conv(width, mid, kernel), nn.SiLU(),
                conv(mid, 2 * z_dim + width, kernel, zero=True),
            )  # fmt: skip
            self.posterior = nn.Sequential(
                group_norm(2 * width), nn.SiLU(), conv(2 * width, mid, kernel), nn.SiLU(),
                conv(mid, 2 * z_dim, kernel),
            )  # fmt: skip
            self.z_proj = conv(z_dim, width, 1)
        self.res = ResBlock(width, width, mid, kernel, dropout)

    def forward(self, h, emb, enc=None, latent=None, t=1.0):
        """h (B, C, h, w), emb (B, E) -> (h, kl (B, Z, h, w) or None, z or None).

        With ``enc``: z from the posterior (noise scaled by t), KL against the prior.
        With ``latent``: z given (prediction from abducted state). Otherwise z from the prior at t.
        """
        h = h + rearrange(self.embed(emb), "b c -> b c 1 1")
        kl = z = None
        if self.stochastic:
            p_loc, p_raw, p_feat = self.prior(h).split([self.z_dim, self.z_dim, h.shape[1]], dim=1)
            p_scale = F.softplus(p_raw + SOFTPLUS_ONE)
            if enc is not None:
                q_loc, q_raw = self.posterior(torch.cat([h, enc], dim=1)).chunk(2, dim=1)
                q_scale = F.softplus(q_raw + SOFTPLUS_ONE)
                z = q_loc + t * q_scale * _noise(q_loc)
                kl = gaussian_kl(q_loc, q_scale, p_loc, p_scale)
            elif latent is not None:
                z = latent.to(h.dtype)
            else:
                z = p_loc + t * p_scale * _noise(p_loc)
            h = h + p_feat + self.z_proj(z)
        return self.res(h), kl, z


class Decoder(nn.Module):
    """From a learned bias at the lowest resolution up through the stages (lowest first)."""

    def __init__(self, resolutions, widths, blocks, latent_stages, z_dim, embed_dim, mid_ratio, dropout, checkpointing):
        super().__init__()
        self.resolutions = list(resolutions)  # lowest resolution first
        self.checkpointing = checkpointing
        self.bias = nn.Parameter(torch.zeros(1, widths[0], *resolutions[0]))
        self.widen = nn.ModuleList(
            nn.Identity() if i == 0 or widths[i - 1] == widths[i] else conv(widths[i - 1], widths[i], 1)
            for i in range(len(widths))
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(
                DecoderBlock(w, z_dim, embed_dim, _mid(w, mid_ratio), kernel_for(res), i < latent_stages, dropout)
                for _ in range(n)
            )
            for i, (res, w, n) in enumerate(zip(resolutions, widths, blocks))
        )

    def forward(self, emb, acts=None, latents=None, t=1.0):
        """emb (B, E); acts: encoder activations lowest resolution first; latents: one per stochastic block.

        Returns (h (B, C_0, H, W), KL terms, latents z), the last two one per stochastic block.
        """
        h = self.bias.expand(emb.shape[0], -1, -1, -1)
        fmt = self._memory_format()
        kls, zs = [], []
        k = 0
        for i, stage in enumerate(self.stages):
            if i:  # upsampled (B, C, 1, w) maps come back NCHW: restore the weights' layout (10-30x faster convs)
                h = F.interpolate(h, size=self.resolutions[i], mode="nearest").contiguous(memory_format=fmt)
                h = self.widen[i](h)
            enc = None if acts is None else acts[i]
            for block in cast(nn.ModuleList, stage):
                latent = latents[k] if (latents is not None and block.stochastic) else None
                h, kl, z = _maybe_checkpoint(self.checkpointing, block, h, emb, enc, latent, t)
                if block.stochastic:
                    kls.append(kl)
                    zs.append(z)
                    k += 1
        return h, kls, zs

    def _memory_format(self) -> torch.memory_format:
        """channels_last if the model was converted to it (read off a 3 x 3 weight, whose layout is unambiguous)."""
        last: DecoderBlock = cast(nn.ModuleList, self.stages[-1])[0]  # type: ignore[assignment]
        w = cast(nn.Conv2d, last.res.branch[2]).weight
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            return torch.channels_last
        return torch.contiguous_format


class DiscretisedGaussian(nn.Module):
    """Pixel likelihood head: loc and log-scale (floored at -9) of a Gaussian binned to 256 levels on [-1, 1]."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(group_norm(width), nn.SiLU(), conv(width, 2, 1))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, C, H, W) -> loc, log_scale (B, 1, H, W) in float32."""
        loc, log_scale = self.net(h).float().chunk(2, dim=1)
        return loc, log_scale.clamp(min=LOG_SCALE_MIN)

    @staticmethod
    def nll(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """-log P(x) per pixel (B, 1, H, W); edge bins absorb the tails."""
        return discretised_gaussian_nll(x, loc, log_scale)


def _noise(like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn in logical (NCHW) order, so channels_last draws the same numbers."""
    return torch.randn(like.shape, dtype=like.dtype, device=like.device)


def _mid(width: int, ratio: float) -> int:
    return max(1, round(width * ratio))
