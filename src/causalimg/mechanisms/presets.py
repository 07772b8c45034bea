"""Architecture fields an image mechanism's config leaves ``None``, filled from its preset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from causalimg.errors import ConfigError


def fill_from_preset(config: Any, preset: Mapping[str, Any], keys: Sequence[str], owner: str) -> dict[str, Any]:
    """Each of ``keys``: the config's value, or the preset's where the config says ``None``."""
    fields = {}
    for key in keys:
        value = getattr(config, key)
        if value is None:
            if key not in preset:
                raise ConfigError(f"{owner}.{key} is required when preset is null")
            value = preset[key]
        fields[key] = value
    return fields
