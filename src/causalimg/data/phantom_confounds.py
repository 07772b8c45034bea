"""Confounds of the phantom: a per-image disease severity that the DSCM's graph does not know.

Each knob is a loading in [0, 1) of some exogenous uniforms on one standard-normal severity per
image, applied as a Gaussian copula: ``u -> Phi(l * severity + sqrt(1 - l^2) * Phi^-1(u))``. A
uniform stays uniform, so every marginal (per-third plaque, lumen areas, contrast fall-off, point
spread, calcium density) is exactly the clean phantom's; only their dependence on the severity,
and through it on each other, changes. At loading 0 the uniform is returned untouched (bit for
bit the clean phantom). The severity and the cues are exogenous: a true counterfactual holds
them fixed, so an intervention on one region's plaque never changes them.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from causalimg.strict import StrictModel

LOADING = Field(0.0, ge=0.0, lt=1.0)
LA_TAPER_WEIGHTS = (0.5, 0.75, 1.0)  # lumen narrowing with severity, proximal -> distal third


class ConfoundConfig(StrictModel):
    """Loadings on the per-image severity (0: off, the clean phantom; docs/data.md says what each is)."""

    diffuse_disease: float = LOADING  # plaque presence and size in every third (CPA and NCPA)
    attenuation_gradient: float = LOADING  # lumen contrast fall-off along the vessel (TAG)
    blooming: float = LOADING  # point-spread sigma and calcium density: calcium blooms more
    lumen_taper: float = LOADING  # narrower lumen, the distal third most, and a smaller distal radius

    @property
    def active(self) -> bool:
        return any(v > 0 for v in self.model_dump().values())


def standard_normal(u: np.ndarray) -> np.ndarray:
    """Phi^-1(u): the severity from its uniform draw."""
    return torch.special.ndtri(torch.from_numpy(np.asarray(u, dtype=np.float64))).numpy()


def load(u: np.ndarray, severity: np.ndarray, loading: float | np.ndarray) -> np.ndarray:
    """Uniforms ``u`` (B, ...) made to load on ``severity`` (B,); negative loadings load inversely.

    ``loading`` is a scalar or broadcasts against ``u``'s trailing axes; 0 returns ``u`` unchanged.
    """
    loading = np.asarray(loading, dtype=np.float64)
    if not loading.any():
        return u
    z = torch.special.ndtri(torch.from_numpy(np.asarray(u, dtype=np.float64)))
    sev = torch.from_numpy(severity.reshape(-1, *([1] * (np.ndim(u) - 1))))
    lam = torch.from_numpy(np.broadcast_to(loading, np.shape(u)[1:]).copy())
    return torch.special.ndtr(lam * sev + torch.sqrt(1.0 - lam * lam) * z).numpy()


def attenuation_gradient(
    image: np.ndarray, lumen: np.ndarray, spacing_mm: float, window_hu: tuple[float, float]
) -> np.ndarray:
    """Per image, HU lost per 10 mm along the lumen, as a reader measures the TAG: the least-squares
    slope of the mean HU of the pixels fully inside the lumen, column by column.

    image, lumen: (B, H, W) image in [-1, 1] (``window_hu`` mapped to it) and lumen fraction; returns (B,).
    """
    lo, hi = window_hu
    hu = (image + 1.0) * (hi - lo) / 2 + lo
    full = lumen >= 0.999
    out = []
    for img, m in zip(hu, full):
        cols = np.nonzero(m.any(0))[0]
        mean = np.array([img[m[:, c], c].mean() for c in cols])
        out.append(-np.polyfit(cols * spacing_mm / 10.0, mean, 1)[0])
    return np.array(out)
