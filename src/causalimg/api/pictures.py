"""Pictures of counterfactuals: difference maps with region boundaries, per image and as a contact sheet.

Difference maps show x~ - x in 0-255 units on a symmetric blue-white-red scale with the regions'
boundaries dashed, so a change can be read against the region it was asked for. ``rgb_*`` make
plain pixel arrays (the explorer page); ``difference_figure`` and ``contact_sheet`` make PNGs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from causalimg.io import atomic_path

DIFF_CMAP = "RdBu_r"


def to_255(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 255] as float64 (H, W)."""
    x = image.detach().cpu().double().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float64)
    return (x.reshape(x.shape[-2:]) + 1) * 127.5


def difference_limit(differences: Sequence[np.ndarray]) -> float:
    """A symmetric colour limit shared by several difference maps (0-255 units, at least 1)."""
    return max([float(np.abs(d).max()) for d in differences] + [1.0])


# -- plain pixels (the explorer) ---------------------------------------------------------------
def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def boundary_pixels(regions: torch.Tensor | np.ndarray, factor: int) -> np.ndarray:
    """(H * f, W * f) bool: dashed lines where the region index changes, at ``factor`` times the size."""
    masks = regions.detach().cpu().numpy() if isinstance(regions, torch.Tensor) else np.asarray(regions)
    index = _upscale(masks.reshape(-1, *masks.shape[-2:]).argmax(0), factor)
    edge = np.zeros(index.shape, dtype=bool)
    edge[:, :-1] |= index[:, :-1] != index[:, 1:]
    edge[:-1, :] |= index[:-1, :] != index[1:, :]
    rows, cols = np.indices(index.shape)
    return edge & (((rows + cols) // 3) % 2 == 0)


def rgb_grey(image: torch.Tensor, factor: int = 1) -> np.ndarray:
    """(H * f, W * f, 3) uint8 of an image in [-1, 1]."""
    grey = np.clip(np.round(to_255(image)), 0, 255).astype(np.uint8)
    return np.repeat(_upscale(grey, factor)[..., None], 3, axis=2)


def rgb_difference(
    difference: np.ndarray, regions: torch.Tensor | np.ndarray, limit: float, factor: int = 1
) -> np.ndarray:
    """(H * f, W * f, 3) uint8: x~ - x (0-255 units) on the diverging scale [-limit, limit], boundaries dashed."""
    scaled = np.clip(difference / (2 * limit) + 0.5, 0, 1)
    rgb = (matplotlib.colormaps[DIFF_CMAP](_upscale(scaled, factor))[..., :3] * 255).round().astype(np.uint8)
    rgb[boundary_pixels(regions, factor)] = 0
    return rgb


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# -- figures (the counterfactual command) ------------------------------------------------------
def _boundaries(ax, regions: np.ndarray) -> None:
    index = regions.reshape(-1, *regions.shape[-2:]).argmax(0).astype(float)
    levels = np.arange(regions.reshape(-1, *regions.shape[-2:]).shape[0] - 1) + 0.5
    if len(levels):
        ax.contour(index, levels=levels, colors="k", linestyles="dashed", linewidths=0.8)


def _panel(ax, image: np.ndarray, title: str, **kw):
    shown = ax.imshow(image, aspect="equal", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=7.5, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def _save(fig, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def difference_figure(
    factual: torch.Tensor, counterfactual: torch.Tensor, regions: torch.Tensor, title: str, caption: str, path: Path
) -> Path:
    """x, x~ and x~ - x of one image, regions dashed; ``caption`` lists asked vs measured areas."""
    x, x_cf = to_255(factual), to_255(counterfactual)
    diff = x_cf - x
    limit = difference_limit([diff])
    h, w = x.shape
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 3 * (7.0 * h / w + 0.35) + 0.6), squeeze=False)
    masks = regions.detach().cpu().numpy()
    grey = {"cmap": "gray", "vmin": 0, "vmax": 255}
    _panel(axes[0, 0], x, "factual x", **grey)
    _panel(axes[1, 0], x_cf, f"counterfactual x~: {title}", **grey)
    shown = _panel(axes[2, 0], diff, "x~ - x (0-255)", cmap=DIFF_CMAP, vmin=-limit, vmax=limit)
    for ax in axes[:, 0]:
        _boundaries(ax, masks)
    fig.colorbar(shown, ax=axes[2, 0], fraction=0.03, pad=0.01)
    fig.text(0.01, 0.01, caption, fontsize=6.5, family="monospace", va="bottom")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.12, hspace=0.5)
    return _save(fig, path)


def contact_sheet(
    factual: torch.Tensor,
    counterfactual: torch.Tensor,
    regions: torch.Tensor,
    labels: Sequence[str],
    title: str,
    path: Path,
) -> Path:
    """One row per image: x, x~ and x~ - x on one shared difference scale; regions dashed.

    factual, counterfactual: (N, 1, H, W); regions: (1 or N, K, H, W); labels: one line per image.
    """
    n = factual.shape[0]
    xs = [to_255(factual[i]) for i in range(n)]
    cfs = [to_255(counterfactual[i]) for i in range(n)]
    diffs = [c - x for c, x in zip(cfs, xs)]
    limit = difference_limit(diffs)
    h, w = xs[0].shape
    panel_w = 4.2
    fig, axes = plt.subplots(n, 3, figsize=(3 * panel_w, n * (panel_w * h / w + 0.45) + 0.7), squeeze=False)
    masks = regions.detach().cpu().numpy()
    grey = {"cmap": "gray", "vmin": 0, "vmax": 255}
    shown = None
    for i in range(n):
        region = masks[i if masks.shape[0] > 1 else 0]
        _panel(axes[i, 0], xs[i], labels[i], **grey)
        _panel(axes[i, 1], cfs[i], "x~", **grey)
        shown = _panel(axes[i, 2], diffs[i], "x~ - x", cmap=DIFF_CMAP, vmin=-limit, vmax=limit)
        for ax in axes[i]:
            _boundaries(ax, region)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.98))
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01)
        bar.set_label("x~ - x (0-255)", fontsize=8)
    return _save(fig, path)
