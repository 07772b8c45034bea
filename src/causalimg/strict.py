"""The strict base of every config model: frozen, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen config model with ``extra="forbid"``: a typo is an error, never a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
