"""The velocity network of the flow-matching mechanism: a conditional U-Net v(x_t, t, pa).

Levels halve both sides (16 x 96 -> 8 x 48 -> ...), so wide and tall images work alike as long as
every side is divisible by 2^(levels - 1); every resize names its target (h, w). The time t and the
parents pa are embedded together by one MLP, and every residual block adds its own projection of
that embedding. Two coordinate channels join the input: the parents are regional areas, and a
translation-equivariant network would otherwise have to infer from padding where a region lies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from causalimg.mechanisms.hvae_blocks import conv, group_norm

Resolution = tuple[int, int]
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, the range sinusoidal frequencies were made for


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t (B,) -> (B, dim): [sin(s t w_i), cos(s t w_i)] with w_i = 10000^(-i / (dim / 2)), s = 1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = rearrange(t.float() * TIME_SCALE, "b -> b 1") * rearrange(freqs, "f -> 1 f")  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def coordinates(batch: int, resolution: Resolution, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): row and column position, each spanning [-1, 1]."""
    h, w = resolution
    rows = torch.linspace(-1, 1, h, device=like.device, dtype=like.dtype)
    cols = torch.linspace(-1, 1, w, device=like.device, dtype=like.dtype)
    return torch.stack(
        [repeat(rows, "h -> b h w", b=batch, w=w), repeat(cols, "w -> b h w", b=batch, h=h)], dim=1
    )  # (B, 2, H, W)


class ConditionEmbedding(nn.Module):
    """emb = MLP([sinusoid(t), pa]): (B,), (B, P) -> (B, E)."""

    def __init__(self, num_parents: int, dim: int):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim + num_parents, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, t: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([sinusoidal_embedding(t, self.dim).to(pa.dtype), pa], dim=1))


class ResBlock(nn.Module):
    """h -> skip(h) + conv(SiLU(GN(conv(SiLU(GN(h))) + proj(emb)))), the last conv zero-initialised."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int):
        super().__init__()
        self.inner = nn.Sequential(group_norm(c_in), nn.SiLU(), conv(c_in, c_out, 3))
        self.embed = nn.Linear(embed_dim, c_out)
        self.outer = nn.Sequential(group_norm(c_out), nn.SiLU(), conv(c_out, c_out, 3, zero=True))
        self.skip = nn.Identity() if c_in == c_out else conv(c_in, c_out, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h (B, C_in, h, w), emb (B, E) -> (B, C_out, h, w)."""
        branch = self.inner(h) + rearrange(self.embed(emb), "b c -> b c 1 1")
        return self.skip(h) + self.outer(branch)


class Level(nn.Module):
    """``n`` residual blocks at one resolution, the first taking ``c_in`` channels to ``width``."""

    def __init__(self, c_in: int, width: int, n: int, embed_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in if j == 0 else width, width, embed_dim) for j in range(n))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, emb)
        return h


class VelocityUNet(nn.Module):
    """v(x_t, t, pa): (B, 1, H, W), (B,), (B, P) -> (B, 1, H, W).

    Down path: per level ``blocks[i]`` residual blocks at ``widths[i]`` channels, a skip kept at the
    end of each level, then a stride-2 conv. Two blocks in the middle. Up path: nearest upsampling to
    the level's (h, w) and a 3 x 3 conv, the level's skip concatenated, ``blocks[i]`` residual blocks.
    The output conv is zero-initialised, so an untrained network predicts v = 0.
    """

    def __init__(self, resolutions: tuple[Resolution, ...], widths: tuple[int, ...], blocks: tuple[int, ...],
                 num_parents: int, embed_dim: int):  # fmt: skip
        super().__init__()
        self.resolutions = resolutions  # one per level, the input's first
        levels = len(widths)
        self.embed = ConditionEmbedding(num_parents, embed_dim)
        self.stem = conv(1 + 2, widths[0], 3)  # image + row / column coordinates
        # built in forward order (level, its downsampling, ..., middle, upsampling, level, ...): the
        # parameters draw their initial values in that order
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i in range(levels):
            self.down.append(Level(widths[max(i - 1, 0)], widths[i], blocks[i], embed_dim))
            if i + 1 < levels:  # level i -> i + 1: (B, C_i, h_i, w_i) -> (B, C_i, h_i / 2, w_i / 2)
                self.downsample.append(nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1))
        self.middle = Level(widths[-1], widths[-1], 2, embed_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in range(levels):
            if i + 1 < levels:  # level i + 1 -> i: nearest upsampling to (h_i, w_i), then a conv C_{i+1} -> C_i
                self.upsample.append(conv(widths[i + 1], widths[i], 3))
            self.up.append(Level(2 * widths[i], widths[i], blocks[i], embed_dim))
        self.head = nn.Sequential(group_norm(widths[0]), nn.SiLU(), conv(widths[0], 1, 3, zero=True))

    def forward(self, x: torch.Tensor, t: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t, pa)  # (B, E)
        h = self.stem(torch.cat([x, coordinates(x.shape[0], self.resolutions[0], x)], dim=1))
        skips = []
        for i, level in enumerate(self.down):
            if i:
                h = self.downsample[i - 1](h)
            h = level(h, emb)
            skips.append(h)  # (B, C_i, h_i, w_i)
        h = self.middle(h, emb)
        for i in reversed(range(len(self.up))):
            if i + 1 < len(self.up):
                h = self.upsample[i](F.interpolate(h, size=self.resolutions[i], mode="nearest"))
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb)  # (B, 2 C_i, h_i, w_i) -> (B, C_i, h_i, w_i)
        return self.head(h)
