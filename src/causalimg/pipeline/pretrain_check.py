"""How good is the pretrained image mechanism? Test nelbo against a trivial baseline, and a picture.

The baseline is the best model that ignores all structure: an independent discretised Gaussian per
pixel with the training split's per-pixel mean and standard deviation. A useful HVAE must sit
clearly below it. The picture puts test inputs, their reconstructions (do = factual parents, no
pixel noise) and fresh samples under the same parents side by side, so a person can judge them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from causalimg.core.scm import DSCM
from causalimg.core.transform import VariableTransform
from causalimg.mechanisms.hvae_blocks import DiscretisedGaussian
from causalimg.report.figures import reconstruction_grid


@torch.no_grad()
def pixel_gaussian_nll(train: Dataset, test: Dataset, batch_size: int = 256) -> float:
    """Test nats per pixel of the per-pixel Gaussian fitted on the training split."""
    total, total_sq, n = 0.0, 0.0, 0
    for batch in DataLoader(train, batch_size=batch_size):
        x = batch["image"].double()  # (B, 1, H, W)
        total, total_sq, n = total + x.sum(0), total_sq + (x * x).sum(0), n + x.shape[0]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp(min=1e-6).sqrt()
    nll, count = 0.0, 0
    for batch in DataLoader(test, batch_size=batch_size):
        x = batch["image"].float()
        per_pixel = DiscretisedGaussian.nll(x, mean.float()[None], std.log().float()[None])
        nll, count = nll + float(per_pixel.flatten(1).mean(1).sum()), count + x.shape[0]
    return nll / count


@torch.no_grad()
def check_pretrained(
    dscm: DSCM, transform: VariableTransform, train: Dataset, test: Dataset, out_dir: Path, max_images: int = 512
) -> dict[str, float]:
    """Test nelbo / nll / kl (nats per pixel and bits/dim) vs the baseline; writes reconstructions.png."""
    image = dscm.image.eval()
    device = next(image.parameters()).device
    sums = {"nelbo": 0.0, "nll": 0.0, "kl": 0.0}
    count = 0
    for batch in DataLoader(test, batch_size=64):
        if count >= max_images:
            break
        x, pa = batch["image"].to(device), batch["parents"].to(device)
        out = image.loss(x, dscm.image_parents(transform.normalise(pa)))
        for key in sums:
            sums[key] += float(out[key].sum())
        count += x.shape[0]
    result = {f"test_{k}": v / count for k, v in sums.items()}
    result["test_bits_per_dim"] = result["test_nelbo"] / math.log(2)
    result["baseline_pixel_gaussian_nll"] = pixel_gaussian_nll(train, test)
    result["baseline_bits_per_dim"] = result["baseline_pixel_gaussian_nll"] / math.log(2)

    shown = next(iter(DataLoader(test, batch_size=6)))
    x = shown["image"].to(device)
    pa = dscm.image_parents(transform.normalise(shown["parents"].to(device)))
    torch.manual_seed(0)
    reconstruction_grid(
        x.cpu(), image.reconstruct(x, pa).cpu(), image.sample(pa, t=0.7).cpu(), out_dir / "reconstructions.png"
    )
    return result
