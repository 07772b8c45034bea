"""How good is the pretrained image mechanism? Its test objective, a trivial baseline, and a picture.

Every term the mechanism's ``loss`` returns is averaged over test images. When it returns a
``nelbo`` (a bound on -log p(x) in nats per pixel, the HVAE's), the bound is set beside the best
model that ignores all structure: an independent discretised Gaussian per pixel with the training
split's per-pixel mean and standard deviation; a useful model must sit clearly below it. The
picture puts test inputs, what the model reconstructs of them (a mechanism that ``Reconstructs``)
and fresh samples under the same parents side by side, so a person can judge them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from causalimg.core.likelihood import discretised_gaussian_nll
from causalimg.core.mechanism import Reconstructs
from causalimg.core.scm import DSCM
from causalimg.core.transform import VariableTransform
from causalimg.report.figures import reconstruction_grid


@torch.no_grad()
def pixel_gaussian_nll(train: Dataset, test: Dataset, batch_size: int = 256) -> float:
    """Test nats per pixel of the per-pixel Gaussian fitted on the training split."""
    total, total_sq, n = torch.zeros(()), torch.zeros(()), 0
    for batch in DataLoader(train, batch_size=batch_size):
        x = batch["image"].double()  # (B, 1, H, W)
        total, total_sq, n = total + x.sum(0), total_sq + (x * x).sum(0), n + x.shape[0]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp(min=1e-6).sqrt()
    nll, count = 0.0, 0
    for batch in DataLoader(test, batch_size=batch_size):
        x = batch["image"].float()
        per_pixel = discretised_gaussian_nll(x, mean.float()[None], std.log().float()[None])
        nll, count = nll + float(per_pixel.flatten(1).mean(1).sum()), count + x.shape[0]
    return nll / count


@torch.no_grad()
def check_pretrained(
    dscm: DSCM, transform: VariableTransform, train: Dataset, test: Dataset, out_dir: Path, max_images: int = 512
) -> dict[str, float]:
    """Test means of the loss terms (and, for a ``nelbo``, bits/dim vs the baseline); writes reconstructions.png."""
    image = dscm.image.eval()
    device = next(image.parameters()).device
    sums: dict[str, float] = {}
    count = 0
    for batch in DataLoader(test, batch_size=64):
        if count >= max_images:
            break
        x, pa = batch["image"].to(device), batch["parents"].to(device)
        out = image.loss(x, dscm.image_parents(transform.normalise(pa)))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value.sum())
        count += x.shape[0]
    result = {f"test_{k}": v / count for k, v in sums.items()}
    if "nelbo" in sums:
        result["test_bits_per_dim"] = result["test_nelbo"] / math.log(2)
        result["baseline_pixel_gaussian_nll"] = pixel_gaussian_nll(train, test)
        result["baseline_bits_per_dim"] = result["baseline_pixel_gaussian_nll"] / math.log(2)

    shown = next(iter(DataLoader(test, batch_size=6)))
    x = shown["image"].to(device)
    pa = dscm.image_parents(transform.normalise(shown["parents"].to(device)))
    torch.manual_seed(0)
    seen = image.reconstruct(x, pa) if isinstance(image, Reconstructs) else x
    reconstruction_grid(x.cpu(), seen.cpu(), image.sample(pa, t=0.7).cpu(), out_dir / "reconstructions.png")
    return result
