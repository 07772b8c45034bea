"""The data stage: generate or scan the data set, and record its schema and variable transform.

Writes ``schema.json`` (the data's variables) and ``transform.json`` (their normalisation, fitted
on the training split); a data set that generates its images caches them in this folder.
"""

from __future__ import annotations

from typing import Any

from causalimg.builder import SCHEMA_FILE, TRANSFORM_FILE, split_parents
from causalimg.core.data import SPLITS, DataSource, split_size
from causalimg.core.transform import VariableTransform
from causalimg.io import atomic_write_text
from causalimg.pipeline.stages.base import Step

READS = ("data", "regions")


def run(step: Step) -> dict[str, Any]:
    def generate() -> DataSource:
        source = step.source
        for split in SPLITS:
            source.split(split)[0]  # a data set that generates on first use caches the split now
        return source

    source = step.main_first(generate)
    sizes = {split: split_size(source.split(split)) for split in SPLITS}
    if step.is_main:
        transform = VariableTransform.fit(source.schema.names, split_parents(source.split("train")))
        atomic_write_text(step.dir / TRANSFORM_FILE, transform.to_json())
        atomic_write_text(step.dir / SCHEMA_FILE, source.schema.to_json())
    return {
        "sizes": sizes,
        "variables": list(source.schema.names),
        "region_names": list(source.schema.regions),
        "image_shape": list(source.image_shape),
        "spacing_mm": float(source.spacing_mm),
    }
