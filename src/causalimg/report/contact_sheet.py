"""A contact sheet of data-set samples: each image plain and with its masks and region boundaries.

Lets a person check by eye that samples look like straightened coronary CPRs and that masks and
regions sit where they should. Axes are in millimetres; the vessel runs left (proximal) to right.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

from causalimg.core.data import DataSource, Split, split_size

PALETTE = ("cyan", "gold", "tab:red", "lime", "magenta", "tab:orange", "tab:blue", "white")  # one per structure


def render_contact_sheet(source: DataSource, split: Split, n: int, path: Path | str) -> Path:
    """Write a PNG of the first ``n`` samples of ``split`` (image above, image + masks below)."""
    data = source.split(split)
    schema = source.schema
    colours = {s.label: PALETTE[i % len(PALETTE)] for i, s in enumerate(schema.structures)}
    titles = {s.label: s.title or s.name for s in schema.structures}
    n = min(n, split_size(data))
    h, w = source.image_shape
    extent = (0.0, w * source.spacing_mm, h * source.spacing_mm, 0.0)  # mm: x along, y across
    width_in = 11.0
    panel_in = width_in * h / w + 0.35
    fig, axes = plt.subplots(2 * n, 1, figsize=(width_in, 2 * n * panel_in + 0.6), squeeze=False)
    for i in range(n):
        item = data[i]
        image = item["image"][0].numpy()  # (H, W) in [-1, 1]
        masks = item["masks"].numpy()  # (C, H, W)
        regions = item["regions"].numpy()  # (K, H, W)
        plain, overlay = axes[2 * i, 0], axes[2 * i + 1, 0]
        for ax in (plain, overlay):
            ax.imshow(image, cmap="gray", vmin=-1, vmax=1, extent=extent, interpolation="nearest")
            ax.set_yticks([0, h * source.spacing_mm / 2, h * source.spacing_mm])
            ax.tick_params(labelsize=6)
        labels = masks.argmax(0)
        tint = np.zeros((h, w, 4))
        for cls, colour in colours.items():
            tint[labels == cls] = to_rgba(colour, 0.35)
            if masks[cls].max() >= 0.5:
                overlay.contour(
                    masks[cls], levels=[0.5], colors=[colour], linewidths=0.7, extent=extent, origin="upper"
                )
        overlay.imshow(tint, extent=extent, interpolation="nearest")
        for region in regions:
            if 0 < region.sum() < region.size:
                overlay.contour(region, levels=[0.5], colors="white", linestyles="--", linewidths=0.8,
                                extent=extent, origin="upper")  # fmt: skip
        values = ", ".join(f"{schema.display(v)} {float(p):.0f}" for v, p in zip(schema.names, item["parents"]))
        plain.set_title(f"{split} #{i}: {values}", fontsize=6.5, loc="left")
    axes[-1, 0].set_xlabel("mm along the vessel (proximal left)", fontsize=7)
    handles = [Line2D([], [], color=c, lw=2, label=titles[k]) for k, c in colours.items()]
    handles.append(Line2D([], [], color="white", ls="--", label="region boundary"))
    legend = fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=True, facecolor="0.3")
    for text in legend.get_texts():
        text.set_color("white")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
