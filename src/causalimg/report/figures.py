"""Figure 1: counterfactuals of one factual image per strategy and region, with difference maps.

Layout: the factual image on top, each column titled with its intervention (one column per
region, e.g. do(CPA-mid := CPA-mid + 20 mm^2), clipped to the variable's support); then, for each
strategy, a row of counterfactuals and a row of difference maps x~ - x (0-255 units, one
symmetric colour scale for the whole figure) with dashed lines at the region boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from causalimg.core.schema import VariableSchema
from causalimg.io import atomic_path


def _boundaries(ax, regions: np.ndarray) -> None:
    """Dashed lines where the region index changes: works for any partition, not only thirds."""
    index = regions.argmax(0).astype(float)  # (H, W)
    levels = np.arange(regions.shape[0] - 1) + 0.5
    if len(levels):
        ax.contour(index, levels=levels, colors="k", linestyles="dashed", linewidths=0.8)


def _show(ax, image: np.ndarray, title: str, **kw) -> matplotlib.image.AxesImage:
    shown = ax.imshow(image, aspect="equal", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=8, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def figure1(
    factual: torch.Tensor,
    counterfactuals: Mapping[str, Sequence[torch.Tensor]],
    regions: torch.Tensor,
    region_names: Sequence[str],
    intervention_titles: Sequence[str],
    path: Path,
) -> Path:
    """Write Figure 1 as a PNG.

    factual: (1, H, W) in [-1, 1]; counterfactuals: strategy -> one (1, H, W) image per region;
    regions: (K, H, W) masks; intervention_titles: one per region, e.g. "do(CPA-mid := 27.1)".
    """
    x = factual.squeeze(0).float().numpy()
    masks = regions.float().numpy()
    k = len(region_names)
    diffs = {s: [(cf.squeeze(0).float().numpy() - x) * 127.5 for cf in cfs] for s, cfs in counterfactuals.items()}
    scale = max([float(np.abs(d).max()) for ds in diffs.values() for d in ds] + [1.0])
    h, w = x.shape
    panel_w = 4.0
    panel_h = panel_w * h / w + 0.3
    rows = 1 + 2 * len(counterfactuals)
    fig, axes = plt.subplots(rows, k, figsize=(panel_w * k, panel_h * rows), squeeze=False)
    grey = {"cmap": "gray", "vmin": -1, "vmax": 1}
    for j in range(k):  # each column is one intervention, named once above it
        _show(axes[0, j], x, f"factual x; below: {intervention_titles[j]}", **grey)
        _boundaries(axes[0, j], masks)
    shown = None
    for i, (strategy, cfs) in enumerate(counterfactuals.items()):
        for j in range(k):
            _show(axes[1 + 2 * i, j], cfs[j].squeeze(0).float().numpy(), strategy, **grey)
            shown = _show(
                axes[2 + 2 * i, j], diffs[strategy][j], f"{strategy}: x~ - x", cmap="RdBu_r", vmin=-scale, vmax=scale
            )
            _boundaries(axes[2 + 2 * i, j], masks)
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01)
        bar.set_label("x~ - x (0-255)", fontsize=8)
    fig.suptitle("Figure 1: counterfactuals per strategy and region (dashed: region boundaries)", fontsize=10)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def error_bars(results: Mapping[str, Mapping[str, float]], schema: VariableSchema, path: Path, title: str) -> Path:
    """Grouped bars of the intervened-region error per intervention, one colour per strategy.

    results: strategy -> area variable -> mean error.
    """
    variables = schema.area_names
    fig, ax = plt.subplots(figsize=(max(10.0, 0.9 * len(variables)), 3.2))
    width = 0.8 / max(len(results), 1)
    positions = np.arange(len(variables))
    for i, (strategy, errors) in enumerate(results.items()):
        ax.bar(positions + i * width, [errors[v] for v in variables], width, label=strategy)
    ax.set_xticks(positions + 0.4 - width / 2, [schema.display(v) for v in variables], fontsize=8)
    ax.set_ylabel(f"error ({schema.areas[0].unit})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, samples: torch.Tensor, path: Path) -> Path:
    """Columns: input, reconstruction (do = factual parents), sample under the same parents.

    All three are (N, 1, H, W) in [-1, 1]; one row per image, shown on the same grey scale.
    """
    columns = (("input", inputs), ("reconstruction", reconstructions), ("sample, same parents", samples))
    n, (h, w) = inputs.shape[0], inputs.shape[-2:]
    fig, axes = plt.subplots(n, 3, figsize=(3 * 4.0, n * (4.0 * h / w + 0.35)), squeeze=False)
    for row in range(n):
        for col, (title, images) in enumerate(columns):
            _show(
                axes[row, col], images[row, 0].float().numpy(), title if row == 0 else "", cmap="gray", vmin=-1, vmax=1
            )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
