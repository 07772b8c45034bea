"""The phantom's exogenous state and geometry: what is drawn per image and how areas become shapes.

Everything is in millimetres. The field of view is ``FOV_H`` x ``FOV_W`` mm, y (rows) runs across
the vessel from the top, x (columns) along it, proximal at x = 0. Along x the geometry is sampled
on "fine columns" (``FINE_MM`` apart, a whole number per pixel); along y every structure is one
interval per fine column and side, so the rasterised area is exactly the sum of interval lengths
times the fine-column width. That makes the area linear in each structure's amplitude (closed
form) unless an interval hits the field-of-view edge or the lumen floor (then bisection).

Each image's exogenous state is drawn from its own random stream keyed by (seed, split, index).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

FOV_H, FOV_W = 16.0, 96.0  # mm
FINE_MM = 0.125  # target width of a fine (supersampling) column in mm
REGION_NAMES: tuple[str, ...] = ("proximal", "mid", "distal")  # axial thirds: the phantom's truth
NUM_REGIONS = 3
REGION_MM = FOV_W / NUM_REGIONS  # 32 mm per third
SIGMA_MAX_MM = 0.5  # largest point-spread sigma
MARGIN_MM = 2.0  # >= 3 * SIGMA_MAX_MM plus one pixel: every change stays this far inside its region
RAMP_MM = 6.0  # lumen window ramp length: long, so regional lumen changes look like gentle tapers
LUMEN_FLOOR = 0.15  # the lumen radius never falls below this fraction of its base profile
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SITES = 2  # plaque site slots per region (non-calcified and calcified each)
AREA_RTOL = 0.005  # the rasterised area matches the requested area within 0.5%

# Marginals of the root variables per region (proximal, mid, distal), in mm^2.
CPA_ZERO_P = (0.4, 0.45, 0.6)  # probability of no calcium at all in the region
CPA_MAX, CPA_KUMA_B = 25.0, (5.0, 6.0, 8.0)  # Kumaraswamy(1.2, b) x max: skewed to small plaques
NCPA_ZERO_P = (0.1, 0.15, 0.25)
NCPA_MAX, NCPA_KUMA_B = 40.0, (3.5, 4.5, 6.0)
LA_RANGE = ((90.0, 135.0), (62.0, 100.0), (40.0, 68.0))  # ~2 r x 32 mm with r tapering 2.0 -> 0.7 mm
AGE_RANGE = (40.0, 80.0)  # years, only when the graph has the age root


@dataclass
class PhantomExogenous:
    """Exogenous state of a batch of phantom images; every field has a leading batch axis (B, ...).

    ``u`` holds the root noises of the variables in the phantom's variable order: the observed
    value of a root, and for a plaque area with the age parent its age-free value.
    """

    key: np.ndarray  # (B, 3) seed, split code, index: also seeds the texture and pixel noise
    r_prox: np.ndarray  # (B,) proximal lumen radius of the base taper (mm)
    r_dist: np.ndarray  # (B,) distal lumen radius (mm)
    taper_gamma: np.ndarray  # (B,) taper shape exponent
    rbump_amp: np.ndarray  # (B, 4) relative radius bumps
    rbump_pos: np.ndarray  # (B, 4) mm
    rbump_len: np.ndarray  # (B, 4) mm (half-length)
    wob_amp: np.ndarray  # (B, 3) centre-line wobble amplitudes (mm)
    wob_freq: np.ndarray  # (B, 3) cycles per field of view
    wob_phase: np.ndarray  # (B, 3) radians
    wall: np.ndarray  # (B, 2) wall thickness outside the plaque, upper and lower side (mm)
    ncpa_pos: np.ndarray  # (B, 3, SITES) site centre as a fraction of the free span in the region
    ncpa_len: np.ndarray  # (B, 3, SITES) site half-length (mm)
    ncpa_on: np.ndarray  # (B, 3, SITES) 1 if the site exists (slot 0 always does)
    ncpa_side: np.ndarray  # (B, 3, SITES, 2) weights of the upper and lower wall
    ca_pos: np.ndarray  # (B, 3, SITES)
    ca_len: np.ndarray  # (B, 3, SITES)
    ca_on: np.ndarray  # (B, 3, SITES)
    ca_side: np.ndarray  # (B, 3, SITES, 2) one-hot: upper or lower wall
    ca_gap: np.ndarray  # (B,) wall between non-calcified plaque and calcium (mm)
    hu_lumen: np.ndarray  # (B,) proximal lumen contrast (HU)
    falloff: np.ndarray  # (B,) fraction of lumen contrast lost at the distal end
    hu_fat: np.ndarray  # (B,)
    hu_wall: np.ndarray  # (B,)
    hu_ncpa: np.ndarray  # (B,)
    hu_ca: np.ndarray  # (B,)
    sigma_mm: np.ndarray  # (B,) Gaussian point-spread sigma (mm)
    noise_hu: np.ndarray  # (B,) pixel noise standard deviation (HU)
    texture_hu: np.ndarray  # (B,) background texture amplitude (HU)
    u: np.ndarray  # (B, V) root noises of the variables

    def __len__(self) -> int:
        return int(self.key.shape[0])

    def pack(self) -> np.ndarray:
        """(B, E) float64: every field flattened, in declaration order (exact for the int key)."""
        return np.concatenate([getattr(self, f.name).reshape(len(self), -1) for f in fields(self)], axis=1)

    @classmethod
    def unpack(cls, packed: np.ndarray, num_variables: int) -> PhantomExogenous:
        """Inverse of :meth:`pack` for a batch (B, E) or one image (E,)."""
        packed = np.atleast_2d(np.asarray(packed, dtype=np.float64))
        out, at = {}, 0
        for name, shape in _field_shapes(num_variables).items():
            size = int(np.prod(shape))
            out[name] = packed[:, at : at + size].reshape(-1, *shape)
            at += size
        out["key"] = out["key"].astype(np.int64)
        return cls(**out)

    def select(self, rows: np.ndarray | slice) -> PhantomExogenous:
        return PhantomExogenous(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def _field_shapes(num_variables: int) -> dict[str, tuple[int, ...]]:
    s = SITES
    return {
        "key": (3,), "r_prox": (), "r_dist": (), "taper_gamma": (), "rbump_amp": (4,), "rbump_pos": (4,),
        "rbump_len": (4,), "wob_amp": (3,), "wob_freq": (3,), "wob_phase": (3,), "wall": (2,),
        "ncpa_pos": (3, s), "ncpa_len": (3, s), "ncpa_on": (3, s), "ncpa_side": (3, s, 2),
        "ca_pos": (3, s), "ca_len": (3, s), "ca_on": (3, s), "ca_side": (3, s, 2), "ca_gap": (),
        "hu_lumen": (), "falloff": (), "hu_fat": (), "hu_wall": (), "hu_ncpa": (), "hu_ca": (),
        "sigma_mm": (), "noise_hu": (), "texture_hu": (), "u": (num_variables,),
    }  # fmt: skip


def stream(key: tuple[int, int, int], purpose: int) -> np.random.Generator:
    """The random stream of one image: (seed, split code, index) plus a purpose (0 state, 1 noise)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([*key, purpose])))


_NUM_UNIFORMS = 160  # per-image uniforms consumed by draw_exogenous (fixed: keeps streams stable)


def _kumaraswamy(u: np.ndarray, a: float, b: np.ndarray) -> np.ndarray:
    """Inverse CDF of Kumaraswamy(a, b) on [0, 1]: a Beta-like law from a uniform, no rejection."""
    return (1.0 - (1.0 - u) ** (1.0 / b)) ** (1.0 / a)


def draw_exogenous(seed: int, split: str, indices: np.ndarray, with_age: bool) -> PhantomExogenous:
    """Draw the exogenous state of images ``indices`` of ``split`` (vectorised after one draw each)."""
    indices = np.asarray(indices, dtype=np.int64)
    b = len(indices)
    keys = np.stack([np.full(b, seed), np.full(b, SPLIT_CODES[split]), indices], axis=1).astype(np.int64)
    u = np.array([stream(tuple(int(v) for v in k), 0).random(_NUM_UNIFORMS) for k in keys]).reshape(b, -1)
    take = iter(range(_NUM_UNIFORMS))

    def nxt(*shape: int) -> np.ndarray:
        cols = [next(take) for _ in range(int(np.prod(shape)))]
        return u[:, cols].reshape(b, *shape)

    def uni(lo: float, hi: float, *shape: int) -> np.ndarray:
        return lo + (hi - lo) * nxt(*shape)

    side_choice = nxt(3, SITES)  # eccentric plaque: upper wall only, both walls, lower wall only
    upper, lower = side_choice < 0.7, side_choice >= 0.4
    thinner = uni(0.3, 1.0, 3, SITES)  # on both walls, the lower one is thinner by this factor
    ncpa_side = np.stack([upper, lower * np.where(upper, thinner, 1.0)], axis=-1).astype(np.float64)
    ca_upper = (nxt(3, SITES) < 0.5).astype(np.float64)
    ncpa_on = (nxt(3, SITES) < 0.5).astype(np.float64)
    ncpa_on[:, :, 0] = 1.0
    ca_on = (nxt(3, SITES) < 0.4).astype(np.float64)
    ca_on[:, :, 0] = 1.0
    state = dict(
        key=keys,
        r_prox=uni(1.5, 2.0),
        r_dist=uni(0.7, 1.0),
        taper_gamma=uni(0.8, 1.3),
        rbump_amp=uni(-0.08, 0.08, 4),
        rbump_pos=uni(0.0, FOV_W, 4),
        rbump_len=uni(3.0, 10.0, 4),
        wob_amp=uni(0.0, 0.25, 3),
        wob_freq=uni(0.3, 2.0, 3),
        wob_phase=uni(0.0, 2 * np.pi, 3),
        wall=uni(0.4, 0.9, 2),
        ncpa_pos=nxt(3, SITES),
        ncpa_len=uni(4.0, 10.0, 3, SITES),
        ncpa_on=ncpa_on,
        ncpa_side=ncpa_side,
        ca_pos=nxt(3, SITES),
        ca_len=uni(1.5, 4.0, 3, SITES),
        ca_on=ca_on,
        ca_side=np.stack([ca_upper, 1.0 - ca_upper], axis=-1),
        ca_gap=uni(0.0, 0.4),
        hu_lumen=uni(250.0, 450.0),
        falloff=uni(0.1, 0.35),
        hu_fat=uni(-120.0, -80.0),
        hu_wall=uni(40.0, 100.0),
        hu_ncpa=uni(20.0, 80.0),
        hu_ca=uni(600.0, 1000.0),
        sigma_mm=uni(0.3, SIGMA_MAX_MM),
        noise_hu=uni(10.0, 25.0),
        texture_hu=uni(8.0, 20.0),
    )
    zero_c, mag_c, zero_n, mag_n, mag_l = (nxt(3) for _ in range(5))
    cpa = np.where(zero_c < np.array(CPA_ZERO_P), 0.0, CPA_MAX * _kumaraswamy(mag_c, 1.2, np.array(CPA_KUMA_B)))
    ncpa = np.where(zero_n < np.array(NCPA_ZERO_P), 0.0, NCPA_MAX * _kumaraswamy(mag_n, 1.3, np.array(NCPA_KUMA_B)))
    lo, hi = np.array(LA_RANGE).T
    la = lo + (hi - lo) * mag_l
    roots = [cpa, ncpa, la]
    if with_age:
        roots.insert(0, uni(*AGE_RANGE)[:, None])
    state["u"] = np.concatenate(roots, axis=1)
    return PhantomExogenous(**state)


@dataclass(frozen=True)
class Grid:
    """Sampling of the field of view at one pixel spacing."""

    spacing_mm: float

    @property
    def shape(self) -> tuple[int, int]:
        return round(FOV_H / self.spacing_mm), round(FOV_W / self.spacing_mm)

    @property
    def supersample(self) -> int:
        return max(1, round(self.spacing_mm / FINE_MM))

    @property
    def fine_mm(self) -> float:
        return self.spacing_mm / self.supersample

    @property
    def fine_x(self) -> np.ndarray:
        """(Nf,) centres of the fine columns (mm)."""
        n = self.shape[1] * self.supersample
        return (np.arange(n) + 0.5) * self.fine_mm

    @property
    def fine_region(self) -> np.ndarray:
        """(Nf,) index of the axial third each fine column lies in."""
        return np.minimum((self.fine_x // REGION_MM).astype(np.int64), NUM_REGIONS - 1)


def _bump(t: np.ndarray) -> np.ndarray:
    """Smooth compact bump (1 - t^2)^2 on |t| < 1."""
    return np.square(np.clip(1.0 - t * t, 0.0, None))


def _ellipse(t: np.ndarray) -> np.ndarray:
    """Half-height profile of an ellipse on |t| < 1: a calcium blob."""
    return np.sqrt(np.clip(1.0 - t * t, 0.0, None))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class Profiles:
    """Amplitude-free profiles along the fine columns; every array is (B, Nf) or (B, 3, Nf)."""

    centre: np.ndarray  # (B, Nf) centre line y (mm)
    r0: np.ndarray  # (B, Nf) base lumen radius (mm)
    lumen_win: np.ndarray  # (B, 3, Nf) where each region's lumen amplitude acts
    ncpa: np.ndarray  # (B, 3, 2, Nf) non-calcified thickness per unit amplitude, upper/lower side
    ca: np.ndarray  # (B, 3, 2, Nf) calcium thickness per unit amplitude
    wall: np.ndarray  # (B, 2) wall thickness
    ca_gap: np.ndarray  # (B,)

    def take(self, rows: np.ndarray) -> Profiles:
        """The profiles of images ``rows`` only."""
        return Profiles(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def _sites(pos: np.ndarray, half: np.ndarray, on: np.ndarray, side: np.ndarray, x: np.ndarray, shape) -> np.ndarray:
    """Sum of site profiles per region and side: (B, 3, 2, Nf); each site lies inside its shrunk region."""
    starts = np.arange(NUM_REGIONS)[None, :, None] * REGION_MM + MARGIN_MM  # (1, 3, 1)
    free = REGION_MM - 2 * MARGIN_MM - 2 * half  # (B, 3, S) span left for the centre
    centre = starts + half + pos * free  # (B, 3, S)
    t = (x[None, None, None, :] - centre[..., None]) / half[..., None]  # (B, 3, S, Nf)
    prof = shape(t) * on[..., None]  # (B, 3, S, Nf)
    return np.einsum("brsn,brsk->brkn", prof, side)  # (B, 3, 2, Nf)


def profiles(exo: PhantomExogenous, grid: Grid) -> Profiles:
    """Evaluate the exogenous shapes on the fine columns of ``grid``."""
    x = grid.fine_x  # (Nf,)
    xs = x[None, :] / FOV_W  # (1, Nf) in [0, 1]
    wob = exo.wob_amp[..., None] * np.sin(2 * np.pi * exo.wob_freq[..., None] * xs[:, None] + exo.wob_phase[..., None])
    centre = FOV_H / 2 + wob.sum(1)  # (B, Nf)
    taper = exo.r_prox[:, None] + (exo.r_dist - exo.r_prox)[:, None] * xs ** exo.taper_gamma[:, None]
    bumps = exo.rbump_amp[..., None] * _bump((x - exo.rbump_pos[..., None]) / exo.rbump_len[..., None])
    r0 = taper * (1.0 + bumps.sum(1))  # (B, Nf)
    lo = np.arange(NUM_REGIONS)[:, None] * REGION_MM + MARGIN_MM  # (3, 1)
    hi = lo + REGION_MM - 2 * MARGIN_MM
    win = _smoothstep((x - lo) / RAMP_MM) * _smoothstep((hi - x) / RAMP_MM)  # (3, Nf)
    lumen_win = np.broadcast_to(win, (len(exo), *win.shape))
    ncpa = _sites(exo.ncpa_pos, exo.ncpa_len, exo.ncpa_on, exo.ncpa_side, x, _bump)
    ca = _sites(exo.ca_pos, exo.ca_len, exo.ca_on, exo.ca_side, x, _ellipse)
    return Profiles(centre, r0, lumen_win, ncpa, ca, exo.wall, exo.ca_gap)


def _per_region(v: np.ndarray, grid: Grid) -> np.ndarray:
    """Sum a (B, Nf) column quantity into the axial thirds: (B, 3), times the fine-column width."""
    b, n = v.shape
    return v.reshape(b, NUM_REGIONS, n // NUM_REGIONS).sum(-1) * grid.fine_mm


def _clip_len(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the interval [a, b] inside the field of view."""
    return np.clip(b, 0.0, FOV_H) - np.clip(a, 0.0, FOV_H)


@dataclass
class Layout:
    """Solved per-column geometry: the interval endpoints (mm) of every structure, (B, Nf) each."""

    lumen: tuple[np.ndarray, np.ndarray]
    ncpa: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # upper, lower
    ca: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    vessel: tuple[np.ndarray, np.ndarray]
    capacity_ok: np.ndarray  # (B, 9) False where the requested area exceeded what fits


def _radius(p: Profiles, amp: np.ndarray) -> np.ndarray:
    scale = 1.0 + np.einsum("br,brn->bn", amp, p.lumen_win)
    return p.r0 * np.maximum(scale, LUMEN_FLOOR)


def _ncpa_intervals(p: Profiles, r: np.ndarray, amp: np.ndarray):
    t = np.einsum("br,brkn->bkn", amp, p.ncpa)  # (B, 2, Nf)
    up = (p.centre - r - t[:, 0], p.centre - r)
    lo = (p.centre + r, p.centre + r + t[:, 1])
    return up, lo


def _ca_intervals(p: Profiles, ncpa_up, ncpa_lo, amp: np.ndarray):
    t = np.einsum("br,brkn->bkn", amp, p.ca)  # (B, 2, Nf)
    gap = p.ca_gap[:, None, None] * np.minimum(t / 0.2, 1.0)  # (B, 2, Nf): no gap where there is no calcium
    up_end = ncpa_up[0] - gap[:, 0]
    lo_start = ncpa_lo[1] + gap[:, 1]
    return (up_end - t[:, 0], up_end), (lo_start, lo_start + t[:, 1])


def _take(interval: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return interval[0][rows], interval[1][rows]


def _solve(area, base: np.ndarray, unit: np.ndarray, target: np.ndarray, lo: float, hi: float):
    """Amplitudes (B, 3) with ``area(amp, rows) == target``: closed form, then bisection where it misses.

    ``area(amp, rows)`` gives the regional areas (len(rows), 3) of images ``rows``; it is monotone
    in each region's amplitude and equals ``base + unit * amp`` while no interval is clipped.
    Bisection searches [lo, hi]. Also returns a (B, 3) flag: False where the target cannot be met.
    """
    everyone = np.arange(len(target))
    amp = (target - base) / np.where(unit > 0, unit, 1.0)
    miss = np.abs(area(amp, everyone) - target) > 0.1 * AREA_RTOL * np.maximum(target, 1e-9)
    ok = np.ones_like(miss)
    rows = np.nonzero(miss.any(1))[0]
    if len(rows):
        goal = target[rows]
        lo_a, hi_a = np.full(goal.shape, lo), np.full(goal.shape, hi)
        fits = (area(hi_a, rows) >= goal * (1 - AREA_RTOL)) & (area(lo_a, rows) <= goal * (1 + AREA_RTOL))
        ok[rows] = fits | ~miss[rows]
        for _ in range(60):
            mid = 0.5 * (lo_a + hi_a)
            below = area(mid, rows) < goal
            lo_a, hi_a = np.where(below, mid, lo_a), np.where(below, hi_a, mid)
        amp[rows] = np.where(miss[rows], hi_a, amp[rows])
    return amp, ok


def layout(p: Profiles, grid: Grid, values: np.ndarray) -> Layout:
    """Solve amplitudes so each structure's area per third equals ``values`` (B, 9: cpa, ncpa, la).

    Order matters only for positions: non-calcified plaque sits on the solved lumen, calcium on the
    solved plaque; each area is an interval length, so it depends on its own amplitude alone.
    """
    cpa, ncpa, la = values[:, 0:3], values[:, 3:6], values[:, 6:9]

    def la_area(amp: np.ndarray, rows: np.ndarray) -> np.ndarray:
        q = p.take(rows)
        r = _radius(q, amp)
        return _per_region(_clip_len(q.centre - r, q.centre + r), grid)

    base = _per_region(2 * p.r0, grid)
    unit = np.einsum("bn,brn->br", 2 * p.r0, p.lumen_win) * grid.fine_mm
    amp_la, ok_la = _solve(la_area, base, unit, la, lo=-1.0 / LUMEN_FLOOR, hi=20.0)
    r = _radius(p, amp_la)

    def ncpa_area(amp: np.ndarray, rows: np.ndarray) -> np.ndarray:
        up, lo = _ncpa_intervals(p.take(rows), r[rows], amp)
        return _per_region(_clip_len(*up) + _clip_len(*lo), grid)

    unit_n = np.einsum("brkn->br", p.ncpa) * grid.fine_mm
    amp_n, ok_n = _solve(ncpa_area, np.zeros_like(ncpa), unit_n, ncpa, lo=0.0, hi=50.0)
    ncpa_up, ncpa_lo = _ncpa_intervals(p, r, amp_n)

    def ca_area(amp: np.ndarray, rows: np.ndarray) -> np.ndarray:
        up, lo = _ca_intervals(p.take(rows), _take(ncpa_up, rows), _take(ncpa_lo, rows), amp)
        return _per_region(_clip_len(*up) + _clip_len(*lo), grid)

    unit_c = np.einsum("brkn->br", p.ca) * grid.fine_mm
    amp_c, ok_c = _solve(ca_area, np.zeros_like(cpa), unit_c, cpa, lo=0.0, hi=50.0)
    ca_up, ca_lo = _ca_intervals(p, ncpa_up, ncpa_lo, amp_c)
    top = np.minimum(ca_up[0], ncpa_up[0]) - p.wall[:, 0:1]
    bottom = np.maximum(ca_lo[1], ncpa_lo[1]) + p.wall[:, 1:2]
    lumen = (p.centre - r, p.centre + r)
    return Layout(lumen, (ncpa_up, ncpa_lo), (ca_up, ca_lo), (top, bottom), np.concatenate([ok_c, ok_n, ok_la], 1))
