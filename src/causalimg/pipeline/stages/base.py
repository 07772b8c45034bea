"""What every stage body gets, and the helpers stages share.

A stage module declares ``READS`` (the config paths it reads: its hash and its guard, see
``pipeline.reads``) and a body ``run(step) -> summary``. ``Step`` bundles the stage's context, its
view of the config and a ``Builder`` over that view, so whatever the body builds reads only
declared fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from torch import nn
from torch.utils.data import Dataset

from causalimg.builder import Builder, load_schema, load_transform
from causalimg.config.run import RunConfig
from causalimg.config.sections import TrackingConfig, TrainConfig
from causalimg.core.data import DataSource
from causalimg.core.schema import VariableSchema
from causalimg.core.transform import VariableTransform
from causalimg.pipeline.stage import StageContext
from causalimg.training.accelerator import make_accelerator
from causalimg.training.loop import Objective, fit

DATA = "data"  # the stage whose folder holds the data cache, schema.json and transform.json

# Seed offsets: every trained network gets its own stream derived from run.seed.
SEED = {"flows": 1, "guidance-segmentor": 2, "evaluation-segmentor": 3, "regressor": 4, "pretrain": 5, "finetune": 6}

T = TypeVar("T")


@dataclass
class Step:
    """One stage's run: its context (folder, upstream folders, process group), config view and builder."""

    ctx: StageContext
    config: RunConfig
    build: Builder
    tracking: TrackingConfig  # where training logs go: changes no result, so no stage declares it
    stage_names: tuple[str, ...] = ()  # every stage of the run, in order

    @property
    def dir(self) -> Path:
        return self.ctx.dir

    @property
    def label(self) -> str:
        """``finetune/pos`` -> ``pos``: the strategy (or predictor) a per-label stage is about."""
        return self.ctx.name.split("/", 1)[1]

    @property
    def strategy(self) -> str:
        """``finetune/pos`` or ``finetune/<mechanism>/pos`` -> ``pos``: a per-strategy stage's strategy."""
        return self.ctx.name.rsplit("/", 1)[1]

    def input_of(self, group: str) -> Path:
        """The folder of this stage's one upstream stage in ``group`` (``pretrain`` or ``pretrain/<mechanism>``)."""
        found = [path for name, path in self.ctx.inputs.items() if name.split("/", 1)[0] == group]
        if len(found) != 1:
            raise RuntimeError(f"stage {self.ctx.name!r} has {len(found)} upstream {group!r} stages, not one")
        return found[0]

    @property
    def data_dir(self) -> Path:
        return self.ctx.inputs.get(DATA, self.ctx.dir)

    @cached_property
    def source(self) -> DataSource:
        return self.build.data_source(self.data_dir)

    @cached_property
    def schema(self) -> VariableSchema:
        return load_schema(self.data_dir)

    @cached_property
    def transform(self) -> VariableTransform:
        return load_transform(self.data_dir)

    @property
    def is_main(self) -> bool:
        return bool(self.ctx.group.is_main_process)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process, then on the others (so caches are written once)."""
        group = self.ctx.group
        if group.is_main_process:
            out = fn()
        group.wait_for_everyone()
        if not group.is_main_process:
            out = fn()
        return out

    def train(
        self, model: nn.Module, objective: Objective, dataset: Dataset, config: TrainConfig, seed: int, **kw: Any
    ) -> dict[str, Any]:
        """``training.loop.fit`` into this stage's folder, resuming its own checkpoints."""
        accelerator = make_accelerator(config, self.dir, tracking=self.tracking)
        result = fit(model, objective, dataset, config, self.dir, accelerator, seed=seed, desc=self.ctx.name,
                     resume=True, **kw)  # fmt: skip
        return result.summary
