"""The data-source contract: images with label masks and the causal variables measured from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol, runtime_checkable

from torch.utils.data import Dataset

Split = Literal["train", "val", "test"]


@runtime_checkable
class DataSource(Protocol):
    """A data set plugin's product.

    Items of ``split(name)`` are dicts of tensors:
      image   (1, H, W) float32 in [-1, 1]
      masks   (C, H, W) float32 soft class fractions (C = NUM_CLASSES), summing to 1 per pixel
      labels  (H, W) int64 hard labels
      parents (P,) float32 variable values in data units, ordered as ``variables``
      regions (K, H, W) float32 region masks, ordered as ``region_names``
      index   () int64 position in the split
    """

    variables: tuple[str, ...]  # the image's parents, in tensor order
    graph: Mapping[str, tuple[str, ...]]  # parents of each variable; roots map to ()
    region_names: tuple[str, ...]
    image_shape: tuple[int, int]  # (H, W)
    spacing_mm: float

    def split(self, name: Split) -> Dataset: ...
