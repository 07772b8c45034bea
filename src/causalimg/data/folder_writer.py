"""Write data in the ``folder`` format: one item per ``.npz`` file, and the folder's ``dataset.json``.

The writer of what ``causalimg.data.folder`` reads, for anything that produces a folder data set
(the augmentation export writes counterfactuals with it). ``dataset.json`` is made from a
``VariableSchema``, so the folder's variables get the same names as the schema's (``cpa_mid``):
label value i is class i, and every structure keeps its variable name, title and abbreviation.
Items are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from causalimg.core.schema import VariableSchema
from causalimg.data.folder import MANIFEST
from causalimg.io import atomic_path, atomic_write_text


def dataset_description(
    schema: VariableSchema, spacing_mm: float, window: tuple[float, float] | None = None
) -> dict[str, Any]:
    """``dataset.json`` for items whose mask channel (or label value) i is ``schema.classes[i]``."""
    return {
        "label_map": {str(label): name for label, name in enumerate(schema.classes)},
        "structures": {
            schema.classes[s.label]: {"variable": s.name, "title": s.title, "abbreviation": s.abbreviation}
            for s in schema.structures
        },
        "spacing_mm": float(spacing_mm),
        "window": None if window is None else [float(window[0]), float(window[1])],
    }


def write_dataset_json(
    root: Path, schema: VariableSchema, spacing_mm: float, window: tuple[float, float] | None = None
) -> Path:
    path = Path(root) / MANIFEST  # keys in the schema's order: it is the order of the folder's variables
    atomic_write_text(path, json.dumps(dataset_description(schema, spacing_mm, window), indent=2) + "\n")
    return path


def write_item(path: Path, image: np.ndarray, mask: np.ndarray, metadata: Mapping[str, Any] | None = None) -> Path:
    """One ``.npz`` item: ``image`` (H, W), ``mask`` (H, W) labels or (C, H, W) fractions, and metadata.

    Metadata values are numbers, strings or lists of numbers (the folder reader hands them back as
    Python values, e.g. ``boundaries_mm`` for the landmarks partitioner). Written through
    ``io.atomic_path``: fsynced and renamed, a full disk named as such.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: folder items are .npz files")
    if image.ndim != 2 or mask.shape[-2:] != image.shape:
        raise ValueError(f"{path}: image {image.shape} and mask {mask.shape} do not fit (H, W) and (C, H, W)")
    arrays = {key: np.asarray(value) for key, value in (metadata or {}).items()}
    reserved = {"image", "mask"} & set(arrays)
    if reserved or any(a.dtype == object for a in arrays.values()):
        raise ValueError(f"{path}: metadata may not be named {sorted(reserved)} nor hold objects")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, image=image, mask=mask, **cast(dict[str, Any], arrays))
    return path
