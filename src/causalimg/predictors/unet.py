"""A small U-Net segmentor for the data set's classes (``VariableSchema.classes``).

Used twice with different seeds and data halves: one copy guides fine-tuning (Seg-CFT,
Pos-Seg-CFT), the other only evaluates counterfactuals, so the evaluation is not scored by the
model the generator was trained to please. Trained with cross-entropy + soft Dice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from causalimg.errors import ConfigError
from causalimg.predictors.configs import SegmentorConfig


def _groups(channels: int) -> int:
    """Largest of 8, 4, 2, 1 dividing ``channels`` (GroupNorm needs an exact split)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (projected) skip."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(c_in), c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _stack(c_in: int, c_out: int, blocks: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(c_in if i == 0 else c_out, c_out, dropout) for i in range(blocks)))


class UNet(nn.Module):
    """(B, 1, H, W) image in [-1, 1] -> (B, num_classes, H, W) logits.

    Works for any H x W divisible by ``2 ** (len(widths) - 1)``, square or not.
    """

    def __init__(self, config: SegmentorConfig | None = None, *, num_classes: int):
        super().__init__()
        self.config = config = config or SegmentorConfig()
        widths = config.widths
        self.factor = 2 ** (len(widths) - 1)
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, w in enumerate(widths):
            self.down.append(_stack(widths[max(i - 1, 0)], w, config.blocks, config.dropout))
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths) - 1)):
            # upsampled deeper features concatenated with the skip of level i
            self.up.append(_stack(widths[i + 1] + widths[i], widths[i], config.blocks, config.dropout))
        self.head = nn.Sequential(
            nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(), nn.Conv2d(widths[0], num_classes, 1)
        )

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ConfigError(f"segmentor expects images (B, 1, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ConfigError(
                f"segmentor widths {self.config.widths} halve the image {len(self.config.widths) - 1} times, "
                f"so H and W must be divisible by {self.factor}; got {h} x {w}"
            )

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check(x)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h)
            skips.append(h)  # level i: (B, widths[i], H / 2^i, W / 2^i)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self._encode(x)
        h = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1))
        return self.head(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck activations averaged over space, (B, widths[-1]): a realism feature space."""
        return reduce(self._encode(x)[-1], "b c h w -> b c", "mean")


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0) -> dict[str, torch.Tensor]:
    """Cross-entropy + soft Dice loss (1 - mean class Dice) on hard labels.

    logits (B, C, H, W); labels (B, H, W) int64. Dice balances the rare plaque classes that
    cross-entropy alone lets the background swamp.
    """
    ce = F.cross_entropy(logits, labels)
    probs = logits.softmax(dim=1)
    onehot = rearrange(F.one_hot(labels, probs.shape[1]), "b h w c -> b c h w").to(probs.dtype)
    inter = reduce(probs * onehot, "b c h w -> c", "sum")
    total = reduce(probs + onehot, "b c h w -> c", "sum")
    dice = 1 - ((2 * inter + smooth) / (total + smooth)).mean()
    return {"loss": ce + dice, "ce": ce, "dice": dice}


def segmentor_objective(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training objective for the generic loop: ``{"loss", "ce", "dice"}`` on a data batch."""
    return dice_ce_loss(model(batch["image"]), batch["labels"])


@torch.no_grad()
def evaluate_dice(
    model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], classes: Sequence[str]
) -> dict[str, float]:
    """Hard (argmax) Dice per class over a whole split, pooled over pixels of all images."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inter = torch.zeros(len(classes), dtype=torch.float64, device=device)
    total = torch.zeros_like(inter)
    for batch in loader:
        pred = model(batch["image"].to(device)).argmax(dim=1)  # (B, H, W)
        labels = batch["labels"].to(device)
        for c in range(len(classes)):
            p, t = pred == c, labels == c
            inter[c] += (p & t).sum()
            total[c] += p.sum() + t.sum()
    model.train(was_training)
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    return {name: float(d) for name, d in zip(classes, dice)}
