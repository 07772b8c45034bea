"""Interventions on regional areas: do(area of S in region k := c) edits S inside k's core only.

Structures are edited in the order lumen, non-calcified plaque, calcium (each sits on the one
before; an area is an interval length, so moving a structure outward keeps its area). For each
intervened (structure, region) one scalar ``s`` is solved so the region's area is ``c``:

* lumen: the radius scale gains ``s * lumen_window_k`` (a plateau with gentle ramps, like the
  observational lumen change), bounded below by the lumen floor;
* plaque, ``s < 0``: the thickness in the core is scaled by ``1 + s`` (``s = -1`` removes it all);
* plaque, ``s > 0``: the thickness grows by ``s * G_k``: the image's own plaque sites (their unit
  profiles) inside the core, or, where the core holds less than ``GROWTH_MIN`` of one site, the
  image's growth site for that region (drawn with the exogenous state, placed in its longest core
  stretch).

Every edit is zero outside the core, so pixels farther than the margin from the core, and every
other region's areas, are bit-identical. The area is linear in ``s`` on each side of 0 (closed
form) until an interval is clipped or the floor binds (then bisection; it is monotone). A target
outside what the core can reach (below the plaque that lies within the margin of a neighbour,
above what fits in the field of view), or one whose edit would push another structure out of the
field of view, is reported as unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from causalimg.data import phantom_geometry as geo
from causalimg.data.phantom_regions import RegionGeometry

GROWTH_MIN = 0.25  # the core's share of site profile below which a region grows its growth site instead
STRUCTURES = ("cpa", "ncpa", "la")  # the phantom's structure order in its variables
BISECTIONS = 60


@dataclass
class Unreachable:
    """One intervened (image, structure, region) whose target cannot be met, with what can."""

    image: int
    structure: int  # index into STRUCTURES
    region: int
    target: float
    least: float  # smallest area the core can give (mm^2)
    most: float  # largest area that fits (mm^2)
    moved: tuple[int, int] | None = None  # (structure, region) of a variable the edit would push out of view


def _piecewise(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(s, 0.0), np.maximum(s, 0.0)


def _solve(area, base, unit_up, unit_down, target, lo: float, hi: float):
    """Per (image, region) ``s`` with ``area(s, rows) == target`` where the target is not NaN.

    ``area`` is monotone in each region's ``s`` and equals ``base + unit * s`` (``unit_up`` for
    s >= 0, ``unit_down`` below) while nothing is clipped. Returns s (B, K) (0 where no target),
    the achieved area (B, K) and the least and most reachable areas (B, K).
    """
    want = ~np.isnan(target)
    goal = np.where(want, target, 0.0)
    diff = goal - base
    unit = np.where(diff >= 0, unit_up, unit_down)
    s = np.where(want & (unit > 0), diff / np.where(unit > 0, unit, 1.0), 0.0).clip(lo, hi)
    rows = np.nonzero(want.any(1))[0]
    achieved = base.copy()
    least, most = base.copy(), base.copy()
    if not len(rows):
        return s, achieved, least, most
    got = area(s[rows], rows)
    miss = want[rows] & (np.abs(got - goal[rows]) > 0.1 * geo.AREA_RTOL * goal[rows] + 1e-9)
    if miss.any():
        lo_a, hi_a = np.full(miss.shape, lo), np.full(miss.shape, hi)
        least[rows], most[rows] = area(lo_a, rows), area(hi_a, rows)
        for _ in range(BISECTIONS):
            mid = 0.5 * (lo_a + hi_a)
            below = area(mid, rows) < goal[rows]
            lo_a, hi_a = np.where(below, mid, lo_a), np.where(below, hi_a, mid)
        s[rows] = np.where(miss, hi_a, s[rows])
        got = area(s[rows], rows)
    achieved[rows] = got
    return s, achieved, least, most


def growth_profiles(
    exo: geo.PhantomExogenous, p: geo.Profiles, regions: RegionGeometry, grid: geo.Grid
) -> tuple[np.ndarray, np.ndarray]:
    """Where plaque grows in each region per unit ``s``: non-calcified and calcified, (B, K, 2, Nf) each."""
    k = regions.run_lo.shape[1]
    slot = np.arange(k) % geo.GROWTH_SLOTS
    x = grid.fine_x
    span = regions.run_hi - regions.run_lo  # (B, K)
    window = regions.plaque_window[:, :, None, :]  # (B, K, 1, Nf)
    out = []
    for sites, pos, half, side, shape in (
        (p.ncpa, exo.grow_ncpa_pos, exo.grow_ncpa_len, exo.grow_ncpa_side, geo.bump),
        (p.ca, exo.grow_ca_pos, exo.grow_ca_len, exo.grow_ca_side, geo.ellipse),
    ):
        own = window * sites.sum(1)[:, None]  # (B, K, 2, Nf) the image's sites inside each core
        h = np.maximum(np.minimum(half[:, slot], span / 2), 1e-6)  # (B, K)
        centre = regions.run_lo + h + pos[:, slot] * (span - 2 * h)
        grow = shape((x - centre[..., None]) / h[..., None])[:, :, None, :] * side[:, slot][..., None] * window
        use_own = own.sum((2, 3)) >= GROWTH_MIN * grow.sum((2, 3))  # (B, K)
        out.append(np.where(use_own[..., None, None], own, grow))
    return out[0], out[1]


def _grown(t: np.ndarray, s: np.ndarray, window: np.ndarray, growth: np.ndarray) -> np.ndarray:
    """Thickness (n, 2, Nf) after scaling down (s < 0) or growing (s > 0) in each region's core."""
    down, up = _piecewise(s)
    scale = 1.0 + np.einsum("bk,bkn->bn", down, window)  # (n, Nf)
    return t * scale[:, None] + np.einsum("bk,bksn->bsn", up, growth)


def intervene(
    sh: geo.Shapes,
    targets: np.ndarray,
    regions: RegionGeometry,
    growth: tuple[np.ndarray, np.ndarray],
    grid: geo.Grid,
) -> tuple[geo.Shapes, list[Unreachable]]:
    """Edit ``sh`` so each (structure, region) with a target (B, 3, K; NaN = none) has that area.

    Structures in ``targets`` follow ``STRUCTURES`` (cpa, ncpa, la). Returns the edited shapes and
    every target that could not be met or that moved another structure out of the field of view.
    """
    fine = grid.fine_mm
    everyone = np.arange(len(targets))
    before = geometric_areas(geo.layout(sh), regions, everyone, fine)  # (B, 3, K)
    sh = geo.Shapes(sh.centre, sh.r0, sh.scale.copy(), sh.ncpa.copy(), sh.ca.copy(), sh.wall, sh.ca_gap)
    unreachable: list[Unreachable] = []
    wl, wp = regions.lumen_window, regions.plaque_window
    grow_n, grow_c = growth

    def record(v: int, achieved, least, most) -> None:
        want = ~np.isnan(targets[:, v])
        bad = want & (np.abs(achieved - targets[:, v]) > 0.2 * geo.AREA_RTOL * np.nan_to_num(targets[:, v]) + 1e-7)
        for b, k in np.argwhere(bad):
            unreachable.append(Unreachable(int(b), v, int(k), float(targets[b, v, k]), least[b, k], most[b, k]))

    # lumen
    if not np.isnan(targets[:, 2]).all():

        def la_area(s: np.ndarray, rows: np.ndarray) -> np.ndarray:
            r = sh.r0[rows] * np.maximum(sh.scale[rows] + np.einsum("bk,bkn->bn", s, wl[rows]), geo.LUMEN_FLOOR)
            return regions.regional(geo.clip_len(sh.centre[rows] - r, sh.centre[rows] + r), rows, fine)

        unit = np.einsum("bn,bkn->bk", 2 * sh.r0, wl) * fine
        s, achieved, least, most = _solve(la_area, before[:, 2], unit, unit, targets[:, 2], -60.0, 60.0)
        sh.scale = sh.scale + np.einsum("bk,bkn->bn", s, wl)
        record(2, achieved, least, most)
    r = sh.radius()

    # non-calcified plaque, on the (possibly edited) lumen
    if not np.isnan(targets[:, 1]).all():

        def ncpa_area(s: np.ndarray, rows: np.ndarray) -> np.ndarray:
            t = _grown(sh.ncpa[rows], s, wp[rows], grow_n[rows])
            up, lo = geo.ncpa_intervals(sh.centre[rows], r[rows], t)
            return regions.regional(geo.clip_len(*up) + geo.clip_len(*lo), rows, fine)

        unit_up = np.einsum("bksn->bk", grow_n) * fine
        unit_down = np.einsum("bsn,bkn->bk", sh.ncpa, wp) * fine
        s, achieved, least, most = _solve(ncpa_area, before[:, 1], unit_up, unit_down, targets[:, 1], -1.0, 60.0)
        sh.ncpa = _grown(sh.ncpa, s, wp, grow_n)
        record(1, achieved, least, most)
    ncpa_iv = geo.ncpa_intervals(sh.centre, r, sh.ncpa)

    # calcium, beyond the (possibly edited) non-calcified plaque
    if not np.isnan(targets[:, 0]).all():

        def ca_area(s: np.ndarray, rows: np.ndarray) -> np.ndarray:
            t = _grown(sh.ca[rows], s, wp[rows], grow_c[rows])
            rows_iv = tuple((a[rows], b[rows]) for a, b in ncpa_iv)
            up, lo = geo.ca_intervals(rows_iv, sh.ca_gap[rows], t)
            return regions.regional(geo.clip_len(*up) + geo.clip_len(*lo), rows, fine)

        unit_up = np.einsum("bksn->bk", grow_c) * fine
        unit_down = np.einsum("bsn,bkn->bk", sh.ca, wp) * fine
        s, achieved, least, most = _solve(ca_area, before[:, 0], unit_up, unit_down, targets[:, 0], -1.0, 60.0)
        sh.ca = _grown(sh.ca, s, wp, grow_c)
        record(0, achieved, least, most)

    after = geometric_areas(geo.layout(sh), regions, everyone, fine)
    moved = np.isnan(targets) & (np.abs(after - before) > 1e-7 + 1e-9 * before)  # (B, 3, K)
    for b, v, k in np.argwhere(moved):
        for t in np.argwhere(~np.isnan(targets[b])):
            unreachable.append(
                Unreachable(
                    int(b),
                    int(t[0]),
                    int(t[1]),
                    float(targets[b, t[0], t[1]]),
                    np.nan,
                    np.nan,
                    moved=(int(v), int(k)),
                )
            )
    return sh, unreachable


def geometric_areas(lay: geo.Layout, regions: RegionGeometry, rows: np.ndarray, fine_mm: float) -> np.ndarray:
    """(B, 3, K) areas of calcified, non-calcified plaque and lumen per region, from the intervals."""
    lengths = lay.lengths()  # (B, 3, Nf)
    return np.einsum("bsn,bkn->bsk", lengths, regions.onehot[rows]) * fine_mm
