"""The strict base of every config model: frozen, unknown keys and non-finite numbers rejected."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field

# The largest seed a config accepts: the 32-bit range that Python's, NumPy's and torch's generators
# all take, with room for the small offsets the stages add (torch takes up to 2^64 - 1).
MAX_SEED = 2**32 - 1

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class StrictModel(BaseModel):
    """Frozen config model with ``extra="forbid"``: a typo is an error, never a silent default.

    ``allow_inf_nan=False`` refuses inf and NaN in every float field, nested tuples included: they
    pass range checks (``inf > 0``) and would fail only stages later, when a config is hashed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)

    # Fields that say how a result is computed, not what it is (how often to log, whether to recompute
    # activations): left out of stage hashes, so changing one redoes nothing.
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset()
