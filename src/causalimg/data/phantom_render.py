"""Rasterise the phantom's solved geometry into fractional masks and a windowed CT-like image.

Per fine column every structure is an interval along y, so a pixel's covered fraction is exact in y
and supersampled in x. Fractions are quantised on a
2^-15 grid through their cumulative sums, which keeps them non-negative, summing to exactly one,
and compact on disk (uint16). Intensities are in HU: fat, wall, lumen contrast with a distal
fall-off, non-calcified plaque and calcium; then a truncated Gaussian point spread (which makes
calcium bloom), a smooth background texture and pixel noise, and a fixed window to [-1, 1].
All image arithmetic is elementwise or shifted sums, so an unchanged neighbourhood gives a
bit-identical pixel.
"""

from __future__ import annotations

import numpy as np

from causalimg.data.phantom_geometry import FOV_H, FOV_W, Grid, Layout, PhantomExogenous, stream

QUANT = 2**15  # fraction quantisation steps
WINDOW_HU = (-200.0, 650.0)  # the fixed CT window mapped to [-1, 1] (calcium saturates, as in CCTA reading)
TEXTURE_MM = 1.0  # node spacing of the background texture


def _covered(intervals: list[list[tuple[np.ndarray, np.ndarray]]], grid: Grid) -> np.ndarray:
    """Covered fraction of every pixel by each class's intervals: (B, C, H, W) float32.

    Along y a row's covered part below an endpoint t (in rows) is F(t) = clip(t - row, 0, 1), a step
    from 1 to 0 through row floor(t). Each endpoint scatters that step as two entries of a
    difference array over rows; a cumulative sum rebuilds F, summed over the fine columns of
    each pixel column. Work is O(endpoints x fine columns) instead of O(H x fine columns).
    """
    h, w = grid.shape
    ends = [(c, sign, t) for c, pairs in enumerate(intervals) for a, b in pairs for sign, t in ((-1.0, a), (1.0, b))]
    t = np.clip(np.stack([e[2] for e in ends], axis=1) / grid.spacing_mm, 0.0, h)  # (B, E, Nf) in rows
    bsz, _, nf = t.shape
    k = np.floor(t).astype(np.int64)  # (B, E, Nf) row holding the fractional part
    frac = t - k
    sign = np.array([e[1] for e in ends])[None, :, None]
    cls = np.array([e[0] for e in ends])[None, :, None]
    n_cls = len(intervals)
    col = (np.arange(nf) // grid.supersample)[None, None, :]
    base = ((np.arange(bsz)[:, None, None] * n_cls + cls) * (h + 2) + k) * w + col  # (B, E, Nf)
    idx = np.concatenate([(base + w).ravel(), base.ravel()])  # row k+1 gets frac, row k gets 1 - frac
    wts = np.concatenate([(sign * frac).ravel(), (sign * (1.0 - frac)).ravel()])
    diff = np.bincount(idx, wts, minlength=bsz * n_cls * (h + 2) * w).astype(np.float32)
    below = diff.reshape(bsz, n_cls, h + 2, w)  # (B, C, H+2, W), turned in place into sums over rows <= i
    for i in range(1, h + 2):  # row by row: much faster than a cumsum along a middle axis
        np.add(below[:, :, i - 1], below[:, :, i], out=below[:, :, i])
    return (below[:, :, -1:] - below[:, :, :h]) * np.float32(1.0 / grid.supersample)  # sum over rows > i


def fractions(lay: Layout, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Quantised foreground fractions (B, 3, H, W) uint16 (lumen, calcified, non-calcified) and vessel (B, H, W).

    The vessel fraction (lumen, plaque and wall) only feeds the intensities.
    """
    (nu0, _), (_, nl1) = lay.ncpa
    plaque_lumen = (nu0, nl1)  # non-calcified plaque hugs the lumen: together one interval
    cum = _covered([[lay.lumen], [plaque_lumen], [plaque_lumen, *lay.ca], [lay.vessel]], grid)
    # cum: (B, 4, H, W) lumen; + non-calcified; + calcified; vessel
    q = np.clip(np.rint(cum[:, :3] * QUANT), 0, QUANT).astype(np.int32)
    for c in (1, 2):  # monotone even after rounding
        np.maximum(q[:, c], q[:, c - 1], out=q[:, c])
    fg = np.diff(q, axis=1, prepend=0)  # lumen, ncpa, ca
    return fg[:, [0, 2, 1]].astype(np.uint16), cum[:, 3]  # class order: lumen, calcified, ncpa


def soft_masks(fg: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) uint16 foreground -> (B, 4, H, W) float32 fractions summing to exactly 1."""
    fg = fg.astype(np.float32) / QUANT
    background = 1.0 - fg.sum(1, keepdims=True)
    return np.concatenate([background, fg], axis=1)


def _texture_and_noise(exo: PhantomExogenous, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Smooth background texture and pixel noise in standard units, (B, H, W) each, from each image's key."""
    h, w = grid.shape
    ny, nx = round(FOV_H / TEXTURE_MM) + 1, round(FOV_W / TEXTURE_MM) + 1
    ys = ((np.arange(h) + 0.5) * grid.spacing_mm) / TEXTURE_MM
    xs = ((np.arange(w) + 0.5) * grid.spacing_mm) / TEXTURE_MM
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    tex = np.empty((len(exo), h, w), np.float32)
    noise = np.empty((len(exo), h, w), np.float32)
    for i, key in enumerate(exo.key):
        rng = stream(tuple(int(k) for k in key), 1)
        nodes = rng.standard_normal((ny, nx))
        rows = nodes[y0] * (1 - fy) + nodes[y0 + 1] * fy  # (H, nx)
        tex[i] = rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx
        noise[i] = rng.standard_normal((h, w), dtype=np.float32)
    return tex, noise


def _blur(img: np.ndarray, sigma_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """Separable Gaussian blur truncated at 3 sigma, per-image sigma, as shifted sums (B, H, W)."""
    radius = int(np.ceil(3 * sigma_mm.max(initial=0.0) / grid.spacing_mm))  # <= phantom_regions.blur_px
    if radius == 0:
        return img
    offs = np.arange(-radius, radius + 1) * grid.spacing_mm  # (2R+1,) mm
    sig = sigma_mm[:, None]
    wts = np.where(np.abs(offs) <= 3 * sig, np.exp(-0.5 * (offs / sig) ** 2), 0.0)
    wts = (wts / wts.sum(1, keepdims=True)).astype(np.float32)  # (B, 2R+1)
    out = img
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for j in range(2 * radius + 1):
            window = [slice(None)] * 3
            window[axis] = slice(j, j + n)
            acc += wts[:, j, None, None] * padded[tuple(window)]
        out = acc
    return out


def image(exo: PhantomExogenous, grid: Grid, fg: np.ndarray, vessel: np.ndarray) -> np.ndarray:
    """The windowed image (B, 1, H, W) float32 in [-1, 1] from quantised fractions and the vessel fraction."""
    _, w = grid.shape
    f = fg.astype(np.float32) / QUANT
    lumen, ca, ncpa = f[:, 0], f[:, 1], f[:, 2]
    fore = lumen + ca + ncpa
    wall = np.clip(vessel - fore, 0.0, None)
    fat = np.clip(1.0 - np.maximum(vessel, fore), 0.0, None)
    x = (np.arange(w) + 0.5) * grid.spacing_mm / FOV_W  # (W,)
    hu_lumen = (exo.hu_lumen[:, None] * (1.0 - exo.falloff[:, None] * x)).astype(np.float32)[:, None, :]

    def col(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float32)[:, None, None]

    tex, noise = _texture_and_noise(exo, grid)
    hu = (fat * col(exo.hu_fat) + wall * col(exo.hu_wall) + lumen * hu_lumen + ncpa * col(exo.hu_ncpa)
          + ca * col(exo.hu_ca) + (fat + wall) * tex * col(exo.texture_hu))  # fmt: skip
    hu = _blur(hu, exo.sigma_mm, grid) + noise * col(exo.noise_hu)
    lo, hi = WINDOW_HU
    return np.clip((hu - lo) / ((hi - lo) / 2) - 1.0, -1.0, 1.0)[:, None]
