"""Where the phantom's truth may act under a configured partition: axial regions and their cores.

The phantom's truth is defined for any AXIAL partition: every image column lies in exactly one
region (regions may be unequal, any number, different per image). An intervention on region k
acts only on its core: the columns of k farther than ``MARGIN_MM`` (rounded up to whole pixels)
from every column of another region and from the image's ends (at the ends this only keeps
``axial-thirds`` counterfactuals as they always were). The point spread reaches at most ``blur_px`` pixels, no
more than that margin, so every pixel outside region k stays bit-identical. A partition that splits
a column between regions (``grid`` with rows > 1) is refused: plaque and lumen are intervals across
the vessel, so a region boundary along it would need a second blur margin across the vessel,
inside a lumen only a few pixels wide. A region whose longest core stretch is shorter than
``MIN_CORE_MM`` cannot hold an intervention and is refused, naming the region and its length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from causalimg.data import phantom_geometry as geo
from causalimg.errors import CausalImgError, ConfigError

MIN_CORE_MM = 4.0  # shortest stretch an intervention needs: a calcium blob (>= 3 mm) and a lumen ramp
LANDMARK_JITTER = 0.2  # landmark cuts move up to this fraction of an equal length either way


def margin_px(spacing_mm: float) -> int:
    """Pixels an intervention keeps away from other regions (``MARGIN_MM``, rounded up)."""
    return math.ceil(geo.MARGIN_MM / spacing_mm - 1e-9)


def blur_px(spacing_mm: float) -> int:
    """Pixels the widest point spread reaches (3 sigma, rounded up)."""
    return math.ceil(3 * geo.SIGMA_MAX_MM / spacing_mm - 1e-9)


def min_region_mm(spacing_mm: float) -> float:
    """Shortest region that holds an intervention: a core plus a margin on each side."""
    return MIN_CORE_MM + 2 * margin_px(spacing_mm) * spacing_mm


def landmark_cuts(uniforms: np.ndarray, num_regions: int, spacing_mm: float) -> np.ndarray:
    """Per-image landmark cut points (B, K - 1) mm: equal lengths, each cut jittered independently.

    The jitter is at most ``LANDMARK_JITTER`` of an equal length and small enough that every region
    keeps ``min_region_mm`` plus a pixel (a pixel belongs to the region holding its centre).
    """
    k = num_regions
    length = geo.FOV_W / k
    # no jitter when equal lengths are already the shortest that fit (too many regions fail the length check)
    jitter = max(0.0, min(LANDMARK_JITTER * length, (length - min_region_mm(spacing_mm) - spacing_mm) / 2))
    base = np.arange(1, k) * length  # (K - 1,)
    return base + jitter * (2.0 * uniforms[:, : k - 1] - 1.0)


def column_regions(masks: torch.Tensor, names: tuple[str, ...], spacing_mm: float, where: str) -> np.ndarray:
    """(B, W) region index of every column of (B, K, H, W) masks; refuses a partition that is not axial."""
    m = masks.detach().cpu().numpy() > 0.5  # (B, K, H, W)
    first = m[:, :, :1, :]  # (B, K, 1, W)
    split_cols = (m != first).any(axis=(1, 2)) | (first[:, :, 0].sum(1) != 1)  # (B, W)
    if split_cols.any():
        b, col = np.argwhere(split_cols)[0]
        holders = [names[k] for k in range(len(names)) if m[b, k, :, col].any()]
        raise ConfigError(
            f"the phantom's truth needs an axial partition (every image column in exactly one region); "
            f"{where}, column {col} (x = {(col + 0.5) * spacing_mm:g} mm) lies in regions {holders}. "
            f"Plaque and lumen are defined along the vessel; a region boundary along it (grid rows > 1) "
            f"would need a blur margin across a lumen a few pixels wide, so such partitions are refused"
        )
    return first[:, :, 0].argmax(1)  # (B, W)


@dataclass
class RegionGeometry:
    """Per image and region: fine columns in the region, the core an intervention may edit, windows.

    onehot:        (B, K, Nf) 1 where a fine column lies in region k (measures regional areas)
    plaque_window: (B, K, Nf) 1 on region k's core: plaque is scaled or grown there only
    lumen_window:  (B, K, Nf) smooth plateau on each stretch of the core (ramps up to ``RAMP_MM``)
    run_lo, run_hi: (B, K) the longest core stretch (mm), where a growth site is placed
    length_mm:     (B, K) region length
    """

    onehot: np.ndarray
    plaque_window: np.ndarray
    lumen_window: np.ndarray
    run_lo: np.ndarray
    run_hi: np.ndarray
    length_mm: np.ndarray

    def regional(self, v: np.ndarray, rows: np.ndarray, fine_mm: float) -> np.ndarray:
        """Sum a (n, Nf) column quantity of images ``rows`` over each region: (n, K) mm^2."""
        return np.einsum("bn,bkn->bk", v, self.onehot[rows]) * fine_mm

    def check_lengths(self, names: tuple[str, ...], where: str, error: type[CausalImgError] = ConfigError) -> None:
        """Refuse regions whose longest core stretch cannot hold an intervention (raises ``error``)."""
        short = (self.run_hi - self.run_lo) < MIN_CORE_MM - 1e-9  # (B, K)
        if short.any():
            b, k = np.argwhere(short)[0]
            margin = geo.MARGIN_MM
            raise error(
                f"region {names[k]!r} is {self.length_mm[b, k]:g} mm long {where}; an intervention on it "
                f"needs {MIN_CORE_MM:g} mm that lie more than {margin:g} mm (the point spread's reach) from every "
                f"other region and from the ends of the image, so a region must be at least "
                f"{MIN_CORE_MM + 2 * margin:g} mm long"
            )


def region_geometry(column_region: np.ndarray, num_regions: int, grid: geo.Grid) -> RegionGeometry:
    """Cores and windows of every region from the (B, W) column -> region map."""
    w = column_region.shape[1]
    k_idx = np.arange(num_regions)
    inside = column_region[:, None, :] == k_idx[None, :, None]  # (B, K, W)
    m = margin_px(grid.spacing_mm)
    padded = np.pad(inside, ((0, 0), (0, 0), (m, m)))  # the field of view's ends count as other regions
    core = inside.copy()
    for d in range(1, m + 1):  # every column within the margin must be in the region
        core &= padded[..., m - d : m - d + w] & padded[..., m + d : m + d + w]
    col = np.arange(w)
    starts = core & ~np.concatenate([np.zeros_like(core[..., :1]), core[..., :-1]], axis=-1)
    ends = core & ~np.concatenate([core[..., 1:], np.zeros_like(core[..., :1])], axis=-1)
    lo_col = np.maximum.accumulate(np.where(starts, col, -1), axis=-1)  # (B, K, W) start of each column's run
    hi_col = np.flip(np.minimum.accumulate(np.flip(np.where(ends, col, w), -1), axis=-1), -1)
    sp = grid.spacing_mm
    lo_mm, hi_mm = lo_col * sp, (hi_col + 1) * sp  # run extent in mm (meaningful on core columns)
    run_len = np.where(core, hi_mm - lo_mm, 0.0)  # (B, K, W)
    longest = run_len.argmax(-1)  # (B, K) a column of the longest run
    run_lo = np.take_along_axis(lo_mm, longest[..., None], -1)[..., 0]
    run_hi = np.where(core.any(-1), np.take_along_axis(hi_mm, longest[..., None], -1)[..., 0], run_lo)
    ss = grid.supersample
    x = grid.fine_x  # (Nf,)
    fine = lambda a: np.repeat(a, ss, axis=-1)  # noqa: E731  (B, K, W) -> (B, K, Nf)
    lo_f, hi_f = fine(lo_mm), fine(hi_mm)
    ramp = np.minimum(geo.RAMP_MM, (hi_f - lo_f) / 2)
    ramp = np.where(ramp > 0, ramp, 1.0)
    plaque = fine(core).astype(np.float64)
    lumen = geo.smoothstep((x - lo_f) / ramp) * geo.smoothstep((hi_f - x) / ramp) * plaque
    return RegionGeometry(
        onehot=fine(inside).astype(np.float64),
        plaque_window=plaque,
        lumen_window=lumen,
        run_lo=run_lo,
        run_hi=run_hi,
        length_mm=inside.sum(-1) * sp,
    )
