"""Export the phantom to the ``folder`` format: see the format, test your own data against the phantom.

``export_phantom(source, out)`` writes ``out/<split>/<index>.npz`` (``image`` (H, W) in [-1, 1],
``mask`` (4, H, W) soft fractions with channel i = label value i, and per-image metadata:
``boundaries_mm``, the image's landmark cut points, ``spacing_mm`` and, with the age graph, ``age``)
and ``out/dataset.json`` (label map, the phantom's structures with their variable names and
titles, pixel spacing). ``data: {name: folder, path: out}`` with the same partitioner then gives the
phantom's images and area parents back (the folder format has no non-area variables, so ``age``
stays metadata). Stems are zero-padded indices, so the folder's order is the phantom's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from causalimg.core.data import SPLITS, Split
from causalimg.data import phantom_render as render
from causalimg.data.folder import MANIFEST
from causalimg.data.folder_writer import write_item
from causalimg.data.phantom import AGE, CHUNK, CLASSES, LANDMARKS_KEY, STRUCTURES, PhantomSource
from causalimg.errors import ConfigError
from causalimg.io import atomic_write_text


def dataset_description(source: PhantomSource) -> dict:
    """The folder's ``dataset.json``: label values, structures named as the phantom's variables, spacing."""
    return {
        "label_map": {str(label): name for label, name in enumerate(CLASSES)},
        "structures": {
            CLASSES[s.label]: {"variable": s.name, "title": s.title, "abbreviation": s.abbreviation} for s in STRUCTURES
        },
        "spacing_mm": source.spacing_mm,
        "window": None,
    }


def export_phantom(source: PhantomSource, out: Path, splits: Sequence[Split] = SPLITS) -> list[Path]:
    """Write the phantom's ``splits`` into ``out`` in the folder format; returns the split folders.

    Each file is written under a temporary name and renamed, so a folder never holds half a file.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ConfigError(f"--splits {','.join(splits)}: choose among {', '.join(SPLITS)}")
    out = Path(out)
    folders = []
    for split in splits:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        n = source.size(split)
        width = len(str(n - 1))
        for start in range(0, n, CHUNK):
            indices = np.arange(start, min(start + CHUNK, n))
            exo = source.exogenous_batch(split, indices)
            r = source.render(exo)
            masks = render.soft_masks(r.fg)  # (B, 4, H, W) channel = label value
            for row, index in enumerate(indices):
                meta = {LANDMARKS_KEY: exo.boundaries_mm[row], "spacing_mm": np.float64(source.spacing_mm)}
                if source.with_age:
                    meta[AGE] = np.float64(r.parents[row, 0])
                write_item(folder / f"{index:0{width}d}.npz", r.image[row, 0], masks[row], meta)
        folders.append(folder)
    atomic_write_text(out / MANIFEST, json.dumps(dataset_description(source), indent=2) + "\n")
    return folders
