"""The discretised Gaussian pixel likelihood: images in [-1, 1] quantised to 256 levels.

Shared by image mechanisms that model pixels with it (the HVAE) and by the pretraining check's
baseline, an independent Gaussian per pixel, so both report nats per pixel on the same scale.
"""

from __future__ import annotations

import torch


def discretised_gaussian_nll(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x) per pixel (same shape as x) under N(loc, exp(log_scale)) binned to 256 levels on [-1, 1].

    The edge bins absorb the tails, so the probabilities of the 256 levels sum to one.
    """
    inv_scale = torch.exp(-log_scale)
    upper = torch.special.ndtr(inv_scale * (x - loc + 1 / 255))
    lower = torch.special.ndtr(inv_scale * (x - loc - 1 / 255))
    log_mid = torch.log((upper - lower).clamp(min=1e-12))
    log_left = torch.log(upper.clamp(min=1e-12))
    log_right = torch.log((1 - lower).clamp(min=1e-12))
    log_p = torch.where(x < -0.999, log_left, torch.where(x > 0.999, log_right, log_mid))
    return -log_p
