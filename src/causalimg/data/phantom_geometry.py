"""The phantom's exogenous state and observational geometry: what is drawn per image and its shapes.

Everything is in millimetres. The field of view is ``FOV_H`` x ``FOV_W`` mm, y (rows) runs across
the vessel from the top, x (columns) along it, proximal at x = 0. Along x the geometry is sampled
on "fine columns" (``FINE_MM`` apart, a whole number per pixel); along y every structure is one
interval per fine column and side, so a rasterised area is exactly the sum of interval lengths
times the fine-column width.

Plaque lives as sites along the whole vessel. Where sites are and how much plaque an image has
follow the vessel's anatomy (proximal, mid and distal thirds, ``ANATOMY``), not the configured
region partition: the observational image is the same whatever the partitioner, and its regional
variables are whatever the partitioner's regions measure of it. Per anatomical third the
observational lumen, non-calcified and calcified areas equal the image's root noises ``u``
(closed form, bisection where an interval is clipped). Interventions on regional variables edit
these shapes (``phantom_interventions``).

Each image's exogenous state is drawn from its own random stream keyed by (seed, split, index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from causalimg.data import phantom_confounds as confounds
from causalimg.data.phantom_confounds import ConfoundConfig

FOV_H, FOV_W = 16.0, 96.0  # mm
FINE_MM = 0.125  # target width of a fine (supersampling) column in mm
ANATOMY: tuple[str, ...] = ("proximal", "mid", "distal")  # thirds that set where and how much plaque grows
NUM_THIRDS = 3
THIRD_MM = FOV_W / NUM_THIRDS  # 32 mm per anatomical third
SIGMA_MAX_MM = 0.5  # largest point-spread sigma
MARGIN_MM = 2.0  # >= 3 * SIGMA_MAX_MM plus a pixel: an intervention acts this far inside its region
SITE_INSET_MM = 2.0  # plaque sites and lumen windows of the observational law stay this far inside each third
RAMP_MM = 6.0  # lumen window ramp length: long, so lumen changes look like gentle tapers
LUMEN_FLOOR = 0.15  # the lumen radius never falls below this fraction of its base profile
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SITES = 2  # plaque site slots per anatomical third (non-calcified and calcified each)
GROWTH_SLOTS = 6  # growth sites for regions without plaque sites; region k uses slot k mod 6
MAX_REGIONS = 16  # landmark cut points drawn per image: up to MAX_REGIONS - 1
AREA_RTOL = 0.005  # the rasterised area matches the requested area within 0.5%

# Marginals of the root variables per anatomical third (proximal, mid, distal), in mm^2.
CPA_ZERO_P = (0.4, 0.45, 0.6)  # probability of no calcium at all in the third
CPA_MAX, CPA_KUMA_B = 25.0, (5.0, 6.0, 8.0)  # Kumaraswamy(1.2, b) x max: skewed to small plaques
NCPA_ZERO_P = (0.1, 0.15, 0.25)
NCPA_MAX, NCPA_KUMA_B = 40.0, (3.5, 4.5, 6.0)
LA_RANGE = ((90.0, 135.0), (62.0, 100.0), (40.0, 68.0))  # ~2 r x 32 mm with r tapering 2.0 -> 0.7 mm
AGE_RANGE = (40.0, 80.0)  # years, only when the graph has the age root


@dataclass
class PhantomExogenous:
    """Exogenous state of a batch of phantom images; every field has a leading batch axis (B, ...).

    ``u`` holds the root noises: the observational calcified, non-calcified and lumen area of each
    anatomical third (9, in that order), preceded by age when the graph has it; plaque noises are
    age-free (the age mechanism scales them).
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
    ncpa_pos: np.ndarray  # (B, 3, SITES) site centre as a fraction of the free span in the third
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
    severity: np.ndarray  # (B,) standard-normal disease severity (acts only through the confounds)
    grow_ncpa_pos: np.ndarray  # (B, GROWTH_SLOTS) growth-site centre as a fraction of a region's free span
    grow_ncpa_len: np.ndarray  # (B, GROWTH_SLOTS) half-length (mm)
    grow_ncpa_side: np.ndarray  # (B, GROWTH_SLOTS, 2) upper / lower wall weights
    grow_ca_pos: np.ndarray  # (B, GROWTH_SLOTS)
    grow_ca_len: np.ndarray  # (B, GROWTH_SLOTS)
    grow_ca_side: np.ndarray  # (B, GROWTH_SLOTS, 2) one-hot
    boundaries_mm: np.ndarray  # (B, K - 1) landmark cut points: equal lengths, jittered
    u: np.ndarray  # (B, V) root noises

    def __len__(self) -> int:
        return int(self.key.shape[0])

    def pack(self) -> np.ndarray:
        """(B, E) float64: every field flattened, in declaration order (exact for the int key)."""
        return np.concatenate([getattr(self, f.name).reshape(len(self), -1) for f in fields(self)], axis=1)

    @classmethod
    def unpack(cls, packed: np.ndarray, num_roots: int, num_cuts: int) -> PhantomExogenous:
        """Inverse of :meth:`pack` for a batch (B, E) or one image (E,)."""
        packed = np.atleast_2d(np.asarray(packed, dtype=np.float64))
        shapes = _field_shapes(num_roots, num_cuts)
        if packed.shape[1] != sum(int(np.prod(s)) for s in shapes.values()):
            raise ValueError(f"packed exogenous state has {packed.shape[1]} values; expected another layout")
        out, at = {}, 0
        for name, shape in shapes.items():
            size = int(np.prod(shape))
            out[name] = packed[:, at : at + size].reshape(-1, *shape)
            at += size
        out["key"] = out["key"].astype(np.int64)
        return cls(**out)

    def select(self, rows: np.ndarray | slice) -> PhantomExogenous:
        return PhantomExogenous(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def _field_shapes(num_roots: int, num_cuts: int) -> dict[str, tuple[int, ...]]:
    s, g = SITES, GROWTH_SLOTS
    return {
        "key": (3,), "r_prox": (), "r_dist": (), "taper_gamma": (), "rbump_amp": (4,), "rbump_pos": (4,),
        "rbump_len": (4,), "wob_amp": (3,), "wob_freq": (3,), "wob_phase": (3,), "wall": (2,),
        "ncpa_pos": (3, s), "ncpa_len": (3, s), "ncpa_on": (3, s), "ncpa_side": (3, s, 2),
        "ca_pos": (3, s), "ca_len": (3, s), "ca_on": (3, s), "ca_side": (3, s, 2), "ca_gap": (),
        "hu_lumen": (), "falloff": (), "hu_fat": (), "hu_wall": (), "hu_ncpa": (), "hu_ca": (),
        "sigma_mm": (), "noise_hu": (), "texture_hu": (), "severity": (),
        "grow_ncpa_pos": (g,), "grow_ncpa_len": (g,), "grow_ncpa_side": (g, 2),
        "grow_ca_pos": (g,), "grow_ca_len": (g,), "grow_ca_side": (g, 2),
        "boundaries_mm": (num_cuts,), "u": (num_roots,),
    }  # fmt: skip


def stream(key: tuple[int, ...], purpose: int) -> np.random.Generator:
    """The random stream of one image: (seed, split code, index) plus a purpose (0 state, 1 noise)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([*key, purpose])))


# Every per-image uniform, in the order it is taken from the image's stream. New draws are only
# ever appended: the images of earlier versions keep their state.
_DRAWS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("side_choice", (3, SITES)), ("thinner", (3, SITES)), ("ca_upper", (3, SITES)), ("ncpa_on", (3, SITES)),
    ("ca_on", (3, SITES)), ("r_prox", ()), ("r_dist", ()), ("taper_gamma", ()), ("rbump_amp", (4,)),
    ("rbump_pos", (4,)), ("rbump_len", (4,)), ("wob_amp", (3,)), ("wob_freq", (3,)), ("wob_phase", (3,)),
    ("wall", (2,)), ("ncpa_pos", (3, SITES)), ("ncpa_len", (3, SITES)), ("ca_pos", (3, SITES)),
    ("ca_len", (3, SITES)), ("ca_gap", ()), ("hu_lumen", ()), ("falloff", ()), ("hu_fat", ()), ("hu_wall", ()),
    ("hu_ncpa", ()), ("hu_ca", ()), ("sigma_mm", ()), ("noise_hu", ()), ("texture_hu", ()),
    ("cpa_zero", (3,)), ("cpa_size", (3,)), ("ncpa_zero", (3,)), ("ncpa_size", (3,)), ("la_size", (3,)),
    ("age", ()), ("severity", ()),
    ("grow_ncpa_pos", (GROWTH_SLOTS,)), ("grow_ncpa_len", (GROWTH_SLOTS,)), ("grow_ncpa_choice", (GROWTH_SLOTS,)),
    ("grow_ncpa_thinner", (GROWTH_SLOTS,)), ("grow_ca_pos", (GROWTH_SLOTS,)), ("grow_ca_len", (GROWTH_SLOTS,)),
    ("grow_ca_upper", (GROWTH_SLOTS,)), ("cuts", (MAX_REGIONS - 1,)),
)  # fmt: skip
_NUM_UNIFORMS = sum(int(np.prod(shape)) for _, shape in _DRAWS)


def _uniforms(keys: np.ndarray) -> dict[str, np.ndarray]:
    """Each image's uniforms by name, (B, *shape) each."""
    u = np.array([stream(tuple(int(v) for v in k), 0).random(_NUM_UNIFORMS) for k in keys]).reshape(len(keys), -1)
    out, at = {}, 0
    for name, shape in _DRAWS:
        size = int(np.prod(shape))
        out[name] = u[:, at : at + size].reshape(len(keys), *shape)
        at += size
    return out


def _kumaraswamy(u: np.ndarray, a: float, b: np.ndarray) -> np.ndarray:
    """Inverse CDF of Kumaraswamy(a, b) on [0, 1]: a Beta-like law from a uniform, no rejection."""
    return (1.0 - (1.0 - u) ** (1.0 / b)) ** (1.0 / a)


def _plaque(zero, size, zero_p, most, a, b, severity, loading) -> np.ndarray:
    """Plaque area per third (B, 3): 0 with probability ``zero_p``, else ``most`` x Kumaraswamy(a, b).

    With a diffuse-disease loading the area is the law's quantile of ONE uniform per third that
    loads on the severity (presence and size together), so each third's marginal law is unchanged.
    """
    p, b = np.array(zero_p), np.array(b)
    if loading == 0:
        return np.where(zero < p, 0.0, most * _kumaraswamy(size, a, b))
    v = confounds.load(np.where(zero < p, zero, p + (1.0 - p) * size), severity, loading)  # uniform, loaded
    return np.where(v < p, 0.0, most * _kumaraswamy(np.clip((v - p) / (1.0 - p), 0.0, 1.0), a, b))


def _sides(choice: np.ndarray, thinner: np.ndarray) -> np.ndarray:
    """Eccentric plaque: upper wall only, both walls (the lower thinner), lower wall only: (..., 2)."""
    upper, lower = choice < 0.7, choice >= 0.4
    return np.stack([upper, lower * np.where(upper, 0.3 + (1.0 - 0.3) * thinner, 1.0)], axis=-1).astype(np.float64)


def draw_exogenous(
    seed: int,
    split: str,
    indices: np.ndarray,
    with_age: bool,
    cuts: Callable[[np.ndarray], np.ndarray] | None = None,
    confound: ConfoundConfig | None = None,
) -> PhantomExogenous:
    """Draw the exogenous state of images ``indices`` of ``split`` (vectorised after one draw each).

    ``cuts`` maps each image's cut uniforms (B, MAX_REGIONS - 1) to its landmark boundaries (B, K - 1).
    """
    indices = np.asarray(indices, dtype=np.int64)
    b = len(indices)
    confound = confound or ConfoundConfig()
    keys = np.stack([np.full(b, seed), np.full(b, SPLIT_CODES[split]), indices], axis=1).astype(np.int64)
    raw = _uniforms(keys)
    severity = confounds.standard_normal(raw["severity"])

    def uni(lo: float, hi: float, name: str, loading: float | np.ndarray = 0.0) -> np.ndarray:
        return lo + (hi - lo) * confounds.load(raw[name], severity, loading)

    ncpa_on = (raw["ncpa_on"] < 0.5).astype(np.float64)
    ncpa_on[:, :, 0] = 1.0
    ca_on = (raw["ca_on"] < 0.4).astype(np.float64)
    ca_on[:, :, 0] = 1.0
    ca_upper = (raw["ca_upper"] < 0.5).astype(np.float64)
    grow_ca_upper = (raw["grow_ca_upper"] < 0.5).astype(np.float64)
    state = dict(
        key=keys,
        r_prox=uni(1.5, 2.0, "r_prox"),
        r_dist=uni(0.7, 1.0, "r_dist", -confound.lumen_taper),
        taper_gamma=uni(0.8, 1.3, "taper_gamma"),
        rbump_amp=uni(-0.08, 0.08, "rbump_amp"),
        rbump_pos=uni(0.0, FOV_W, "rbump_pos"),
        rbump_len=uni(3.0, 10.0, "rbump_len"),
        wob_amp=uni(0.0, 0.25, "wob_amp"),
        wob_freq=uni(0.3, 2.0, "wob_freq"),
        wob_phase=uni(0.0, 2 * np.pi, "wob_phase"),
        wall=uni(0.4, 0.9, "wall"),
        ncpa_pos=raw["ncpa_pos"],
        ncpa_len=uni(4.0, 10.0, "ncpa_len"),
        ncpa_on=ncpa_on,
        ncpa_side=_sides(raw["side_choice"], raw["thinner"]),
        ca_pos=raw["ca_pos"],
        ca_len=uni(1.5, 4.0, "ca_len"),
        ca_on=ca_on,
        ca_side=np.stack([ca_upper, 1.0 - ca_upper], axis=-1),
        ca_gap=uni(0.0, 0.4, "ca_gap"),
        hu_lumen=uni(250.0, 450.0, "hu_lumen"),
        falloff=uni(0.1, 0.35, "falloff", confound.attenuation_gradient),
        hu_fat=uni(-120.0, -80.0, "hu_fat"),
        hu_wall=uni(40.0, 100.0, "hu_wall"),
        hu_ncpa=uni(20.0, 80.0, "hu_ncpa"),
        hu_ca=uni(600.0, 1000.0, "hu_ca", confound.blooming),
        sigma_mm=uni(0.3, SIGMA_MAX_MM, "sigma_mm", confound.blooming),
        noise_hu=uni(10.0, 25.0, "noise_hu"),
        texture_hu=uni(8.0, 20.0, "texture_hu"),
        severity=severity,
        grow_ncpa_pos=raw["grow_ncpa_pos"],
        grow_ncpa_len=uni(4.0, 10.0, "grow_ncpa_len"),
        grow_ncpa_side=_sides(raw["grow_ncpa_choice"], raw["grow_ncpa_thinner"]),
        grow_ca_pos=raw["grow_ca_pos"],
        grow_ca_len=uni(1.5, 4.0, "grow_ca_len"),
        grow_ca_side=np.stack([grow_ca_upper, 1.0 - grow_ca_upper], axis=-1),
        boundaries_mm=np.zeros((b, 0)) if cuts is None else cuts(raw["cuts"]),
    )
    disease = confound.diffuse_disease  # more severe: plaque in more thirds, and larger
    cpa = _plaque(raw["cpa_zero"], raw["cpa_size"], CPA_ZERO_P, CPA_MAX, 1.2, CPA_KUMA_B, severity, disease)
    ncpa = _plaque(raw["ncpa_zero"], raw["ncpa_size"], NCPA_ZERO_P, NCPA_MAX, 1.3, NCPA_KUMA_B, severity, disease)
    mag_l = uni(0, 1, "la_size", -confound.lumen_taper * np.array(confounds.LA_TAPER_WEIGHTS))
    lo, hi = np.array(LA_RANGE).T
    la = lo + (hi - lo) * mag_l
    roots = [cpa, ncpa, la]
    if with_age:
        roots.insert(0, uni(*AGE_RANGE, "age")[:, None])
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


def bump(t: np.ndarray) -> np.ndarray:
    """Smooth compact bump (1 - t^2)^2 on |t| < 1: a non-calcified plaque site."""
    return np.square(np.clip(1.0 - t * t, 0.0, None))


def ellipse(t: np.ndarray) -> np.ndarray:
    """Half-height profile of an ellipse on |t| < 1: a calcium blob."""
    return np.sqrt(np.clip(1.0 - t * t, 0.0, None))


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class Profiles:
    """Amplitude-free profiles along the fine columns, per anatomical third; (B, Nf) or (B, 3, ..., Nf)."""

    centre: np.ndarray  # (B, Nf) centre line y (mm)
    r0: np.ndarray  # (B, Nf) base lumen radius (mm)
    lumen_win: np.ndarray  # (B, 3, Nf) where each third's lumen amplitude acts
    ncpa: np.ndarray  # (B, 3, 2, Nf) non-calcified thickness per unit amplitude, upper/lower side
    ca: np.ndarray  # (B, 3, 2, Nf) calcium thickness per unit amplitude
    wall: np.ndarray  # (B, 2) wall thickness
    ca_gap: np.ndarray  # (B,)

    def take(self, rows: np.ndarray) -> Profiles:
        """The profiles of images ``rows`` only."""
        return Profiles(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def _sites(pos: np.ndarray, half: np.ndarray, on: np.ndarray, side: np.ndarray, x: np.ndarray, shape) -> np.ndarray:
    """Sum of site profiles per third and side: (B, 3, 2, Nf); each site lies SITE_INSET_MM inside its third."""
    starts = np.arange(NUM_THIRDS)[None, :, None] * THIRD_MM + SITE_INSET_MM  # (1, 3, 1)
    free = THIRD_MM - 2 * SITE_INSET_MM - 2 * half  # (B, 3, S) span left for the centre
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
    bumps = exo.rbump_amp[..., None] * bump((x - exo.rbump_pos[..., None]) / exo.rbump_len[..., None])
    r0 = taper * (1.0 + bumps.sum(1))  # (B, Nf)
    lo = np.arange(NUM_THIRDS)[:, None] * THIRD_MM + SITE_INSET_MM  # (3, 1)
    hi = lo + THIRD_MM - 2 * SITE_INSET_MM
    win = smoothstep((x - lo) / RAMP_MM) * smoothstep((hi - x) / RAMP_MM)  # (3, Nf)
    lumen_win = np.broadcast_to(win, (len(exo), *win.shape))
    ncpa = _sites(exo.ncpa_pos, exo.ncpa_len, exo.ncpa_on, exo.ncpa_side, x, bump)
    ca = _sites(exo.ca_pos, exo.ca_len, exo.ca_on, exo.ca_side, x, ellipse)
    return Profiles(centre, r0, lumen_win, ncpa, ca, exo.wall, exo.ca_gap)


def _per_third(v: np.ndarray, grid: Grid) -> np.ndarray:
    """Sum a (B, Nf) column quantity into the anatomical thirds: (B, 3), times the fine-column width."""
    b, n = v.shape
    return v.reshape(b, NUM_THIRDS, n // NUM_THIRDS).sum(-1) * grid.fine_mm


def clip_len(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the interval [a, b] inside the field of view."""
    return np.clip(b, 0.0, FOV_H) - np.clip(a, 0.0, FOV_H)


@dataclass
class Shapes:
    """The geometry per fine column before it becomes intervals; what an intervention edits.

    The lumen radius is ``r0 * max(scale, LUMEN_FLOOR)``; non-calcified plaque grows outward from
    the lumen by ``ncpa`` on each side, calcium sits beyond it (after a gap) with thickness ``ca``.
    """

    centre: np.ndarray  # (B, Nf) mm
    r0: np.ndarray  # (B, Nf) base radius (mm)
    scale: np.ndarray  # (B, Nf) lumen scale
    ncpa: np.ndarray  # (B, 2, Nf) thickness upper, lower (mm)
    ca: np.ndarray  # (B, 2, Nf)
    wall: np.ndarray  # (B, 2)
    ca_gap: np.ndarray  # (B,)

    def take(self, rows: np.ndarray) -> Shapes:
        return Shapes(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def radius(self) -> np.ndarray:
        return self.r0 * np.maximum(self.scale, LUMEN_FLOOR)


Interval = tuple[np.ndarray, np.ndarray]


@dataclass
class Layout:
    """Solved per-column geometry: the interval endpoints (mm) of every structure, (B, Nf) each."""

    lumen: Interval
    ncpa: tuple[Interval, Interval]  # upper, lower
    ca: tuple[Interval, Interval]
    vessel: Interval

    def lengths(self) -> np.ndarray:
        """(B, 3, Nf) covered length per fine column of calcified, non-calcified plaque and lumen."""
        ca = clip_len(*self.ca[0]) + clip_len(*self.ca[1])
        ncpa = clip_len(*self.ncpa[0]) + clip_len(*self.ncpa[1])
        return np.stack([ca, ncpa, clip_len(*self.lumen)], axis=1)


def ncpa_intervals(centre: np.ndarray, r: np.ndarray, t: np.ndarray) -> tuple[Interval, Interval]:
    """Non-calcified plaque of thickness ``t`` (B, 2, Nf) on the lumen of radius ``r``: upper, lower."""
    return (centre - r - t[:, 0], centre - r), (centre + r, centre + r + t[:, 1])


def ca_intervals(ncpa: Sequence[Interval], gap: np.ndarray, t: np.ndarray) -> tuple[Interval, Interval]:
    """Calcium of thickness ``t`` (B, 2, Nf) beyond the non-calcified plaque, after a wall ``gap`` (B,)."""
    ncpa_up, ncpa_lo = ncpa
    g = gap[:, None, None] * np.minimum(t / 0.2, 1.0)  # (B, 2, Nf): no gap where there is no calcium
    up_end = ncpa_up[0] - g[:, 0]
    lo_start = ncpa_lo[1] + g[:, 1]
    return (up_end - t[:, 0], up_end), (lo_start, lo_start + t[:, 1])


def layout(sh: Shapes) -> Layout:
    """The intervals of every structure; positions stack outward from the lumen, areas do not interact."""
    r = sh.radius()
    ncpa = ncpa_intervals(sh.centre, r, sh.ncpa)
    ca_up, ca_lo = ca_intervals(ncpa, sh.ca_gap, sh.ca)
    top = np.minimum(ca_up[0], ncpa[0][0]) - sh.wall[:, 0:1]
    bottom = np.maximum(ca_lo[1], ncpa[1][1]) + sh.wall[:, 1:2]
    return Layout((sh.centre - r, sh.centre + r), ncpa, (ca_up, ca_lo), (top, bottom))


def _solve(area, base: np.ndarray, unit: np.ndarray, target: np.ndarray, lo: float, hi: float):
    """Amplitudes (B, 3) with ``area(amp, rows) == target``: closed form, then bisection where it misses.

    ``area(amp, rows)`` gives the areas per third (len(rows), 3) of images ``rows``; it is monotone
    in each third's amplitude and equals ``base + unit * amp`` while no interval is clipped.
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


def observe(p: Profiles, grid: Grid, values: np.ndarray) -> tuple[Shapes, np.ndarray]:
    """Shapes whose areas per anatomical third equal ``values`` (B, 9: cpa, ncpa, la per third).

    Order matters only for positions: non-calcified plaque sits on the solved lumen, calcium on the
    solved plaque; each area is an interval length, so it depends on its own amplitude alone.
    Also returns (B, 9) flags, False where a requested area exceeded what fits.
    """
    cpa, ncpa, la = values[:, 0:3], values[:, 3:6], values[:, 6:9]

    def radius(q: Profiles, amp: np.ndarray) -> np.ndarray:
        return q.r0 * np.maximum(1.0 + np.einsum("br,brn->bn", amp, q.lumen_win), LUMEN_FLOOR)

    def la_area(amp: np.ndarray, rows: np.ndarray) -> np.ndarray:
        q = p.take(rows)
        r = radius(q, amp)
        return _per_third(clip_len(q.centre - r, q.centre + r), grid)

    base = _per_third(2 * p.r0, grid)
    unit = np.einsum("bn,brn->br", 2 * p.r0, p.lumen_win) * grid.fine_mm
    amp_la, ok_la = _solve(la_area, base, unit, la, lo=-1.0 / LUMEN_FLOOR, hi=20.0)
    r = radius(p, amp_la)

    def ncpa_area(amp: np.ndarray, rows: np.ndarray) -> np.ndarray:
        up, lo = ncpa_intervals(p.centre[rows], r[rows], np.einsum("br,brkn->bkn", amp, p.ncpa[rows]))
        return _per_third(clip_len(*up) + clip_len(*lo), grid)

    unit_n = np.einsum("brkn->br", p.ncpa) * grid.fine_mm
    amp_n, ok_n = _solve(ncpa_area, np.zeros_like(ncpa), unit_n, ncpa, lo=0.0, hi=50.0)
    t_n = np.einsum("br,brkn->bkn", amp_n, p.ncpa)
    ncpa_iv = ncpa_intervals(p.centre, r, t_n)

    def ca_area(amp: np.ndarray, rows: np.ndarray) -> np.ndarray:
        rows_iv = tuple((a[rows], b[rows]) for a, b in ncpa_iv)
        up, lo = ca_intervals(rows_iv, p.ca_gap[rows], np.einsum("br,brkn->bkn", amp, p.ca[rows]))
        return _per_third(clip_len(*up) + clip_len(*lo), grid)

    unit_c = np.einsum("brkn->br", p.ca) * grid.fine_mm
    amp_c, ok_c = _solve(ca_area, np.zeros_like(cpa), unit_c, cpa, lo=0.0, hi=50.0)
    scale = 1.0 + np.einsum("br,brn->bn", amp_la, p.lumen_win)
    t_c = np.einsum("br,brkn->bkn", amp_c, p.ca)
    return Shapes(p.centre, p.r0, scale, t_n, t_c, p.wall, p.ca_gap), np.concatenate([ok_c, ok_n, ok_la], 1)
