"""causalimg: counterfactual image generation with deep structural causal models."""

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from causalimg.api import CounterfactualModel, CounterfactualResult

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("causalimg")
"""Marker for plugin hook implementations: decorate ``causalimg_*`` functions with it."""

_LAZY = {"CounterfactualModel", "CounterfactualResult"}  # causalimg.api: torch and the plugins, loaded on first use


def __getattr__(name: str) -> object:
    """``causalimg.CounterfactualModel`` without making ``import causalimg`` load torch."""
    if name in _LAZY:
        from causalimg import api

        return getattr(api, name)
    raise AttributeError(f"module 'causalimg' has no attribute {name!r}")


__all__ = ["CounterfactualModel", "CounterfactualResult", "__version__", "hookimpl"]
