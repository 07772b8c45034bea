"""causalimg: counterfactual image generation with deep structural causal models."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("causalimg")
"""Marker for plugin hook implementations: decorate ``causalimg_*`` functions with it."""

__all__ = ["__version__", "hookimpl"]
