"""The data-source contract: images with class masks, region masks and the variables measured from them.

Required of every data set: ``DataSource``. Optional capabilities are protocols of their own, so
a stage that can use one checks for it by type and says what it does without it:
``TrueCounterfactuals`` (a data set that knows its causal model, like the phantom).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset

from causalimg.core.schema import VariableSchema

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@runtime_checkable
class DataSource(Protocol):
    """A data set plugin's product.

    Items of ``split(name)`` are dicts of tensors:
      image   (1, H, W) float32 in [-1, 1]
      masks   (C, H, W) float32 soft class fractions (C = schema.num_classes), summing to 1 per pixel
      labels  (H, W) int64 hard labels
      parents (P,) float32 variable values in their units, ordered as ``schema.names``
      regions (K, H, W) float32 region masks, ordered as ``schema.regions``
      index   () int64 position in the split
    """

    schema: VariableSchema
    image_shape: tuple[int, int]  # (H, W)
    spacing_mm: float

    def split(self, name: Split) -> Dataset: ...


def split_size(split: Dataset) -> int:
    """The number of items of a split (map-style data sets have a length; torch's type does not say so)."""
    return len(split)  # type: ignore[arg-type]


@runtime_checkable
class TrueCounterfactuals(Protocol):
    """A data set that can render the TRUE counterfactual of its own images (the phantom can)."""

    def true_counterfactual_batch(
        self, split: Split, indices: Sequence[int], interventions: Sequence[Mapping[str, float]]
    ) -> dict[str, torch.Tensor]:
        """``image`` (B, 1, H, W), ``masks`` (B, C, H, W), ``labels`` and ``parents`` (B, P) of the
        same exogenous state under ``interventions[i]`` (variable -> value); a target that cannot
        exist in an image's geometry raises ``InterventionError``."""
        ...
