"""Everything about a run that can be known before its first stage, checked at once.

``causalimg validate`` and ``python -m causalimg.run`` call ``preflight`` after the config
validates: it builds the data set (without generating or reading images) and the image
mechanism, and refuses, in one message, what would otherwise fail minutes or hours later: batches
larger than the split they are drawn from, more evaluation images than the split has, an image
size the architectures cannot take, a fine-tuning mode the image mechanism lacks the parts for, a
Figure 1 structure the data does not have. What only degrades (ground truth from a data set that
has none) comes back as notes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from causalimg.config.run import RunConfig, finetune_settings, finetune_settings_path, mechanism_paths, runs_on
from causalimg.core.data import SPLITS, TrueCounterfactuals, split_size
from causalimg.core.mechanism import GuidedPrediction, HasEncoder
from causalimg.errors import CausalImgError, ConfigError
from causalimg.plugins.manager import Registry


def preflight(config: RunConfig, registry: Registry) -> list[str]:
    """Raise one ``ConfigError`` listing every problem found; return notes on what will degrade."""
    from causalimg.builder import Builder  # torch and the plugins' networks: only once the config validates

    build = Builder(config, registry)
    problems: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="causalimg-preflight-") as root:
        try:
            source = build.data_source(Path(root))
        except CausalImgError as err:
            raise ConfigError(f"data: {err}") from None
        schema = source.schema
        sizes = {split: split_size(source.split(split)) for split in SPLITS}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    guided = any(terms for terms in config.finetune.strategies.values())
    batches = {
        "flows_train": (config.flows_train, sizes["train"]),
        "predictors.segmentor.train": (config.predictors.segmentor.train, sizes["train"] // 2),
        "predictors.regressor.train": (config.predictors.regressor.train, sizes["train"]),
        "pretrain": (config.pretrain, sizes["train"]),
    }
    if guided:
        for label in mechanism_paths(config):
            train = finetune_settings(config, label).train
            batches[f"{finetune_settings_path(config, label)}.train"] = (train, sizes["train"])
    for where, (train, available) in batches.items():
        if train.batch_size * world > available:
            per = f" x {world} processes" if world > 1 else ""
            problems.append(
                f"{where}.batch_size = {train.batch_size}{per} exceeds the {available} training images it draws from"
            )
    split, wanted = config.evaluate.split, config.evaluate.num_images
    if wanted > sizes[split]:
        problems.append(f"evaluate.num_images = {wanted} exceeds the {sizes[split]} images of the {split} split")
    height, width = source.image_shape
    factor = 2 ** (len(config.predictors.segmentor.widths) - 1)
    if height % factor or width % factor:
        problems.append(
            f"predictors.segmentor.widths halve the image {len(config.predictors.segmentor.widths) - 1} times, "
            f"so its sides must divide by {factor}; the data's images are {height} x {width}"
        )
    for label, path in mechanism_paths(config).items():
        try:
            mechanism = Builder(config, registry, path).image_mechanism(schema, source.image_shape)
        except CausalImgError as err:
            problems.append(f"{path}: {err}")
            continue
        at_sampling = [s for s in config.finetune.sampling_time if runs_on(config, label, s)]
        if at_sampling and not isinstance(mechanism, GuidedPrediction):
            name = label or config.image_mechanism.name
            problems.append(
                f"finetune.sampling_time ({', '.join(at_sampling)}) needs image mechanisms that can be guided while "
                f"they predict (`predict_guided`); {path} ({Builder(config, registry, path).mechanism_config.name!r}) "
                f"cannot: fine-tune with those terms instead, or list the mechanisms it steers without {name!r} "
                f"(finetune.sampling_time.<strategy>.mechanisms)"
            )
        if guided and config.finetune.trainable == "decoder" and not isinstance(mechanism, HasEncoder):
            problems.append(
                f"finetune.trainable = 'decoder' needs an image mechanism with an `encoder`; "
                f"{path} ({Builder(config, registry, path).mechanism_config.name!r}) has none: use 'all'"
            )
    figure = config.report.figure.structure
    if figure is not None and figure not in [s.name for s in schema.structures]:
        names = ", ".join(s.name for s in schema.structures)
        problems.append(f"report.figure.structure = {figure!r} is not a structure of the data ({names})")
    metrics = [m.name for m in config.evaluate.metrics]
    if "ground-truth" in metrics and not isinstance(source, TrueCounterfactuals):
        notes.append(f"data set {config.data.name!r} has no true counterfactuals: the ground-truth metric will say so")
    if problems:
        count = len(problems)
        raise ConfigError(
            f"the config cannot run ({count} problem{'s' * (count > 1)}):\n" + "\n".join(f"  {p}" for p in problems)
        )
    return notes
