"""The fixed (non-plugin) sections of a run config. Plugin sections are added by ``config.run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from causalimg.config.base import Seed, StrictModel

# An Adam(W) beta: torch refuses values outside [0, 1) when the optimizer is built, stages later.
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class RunSection(StrictModel):
    """Where outputs go and the seed every random choice derives from."""

    dir: Path = Path("runs/default")
    seed: Seed = 0


class PluginsSection(StrictModel):
    """Extra one-file plugin directories (only these and installed entry points are loaded)."""

    dirs: tuple[Path, ...] = ()


class TrainConfig(StrictModel):
    """One optimisation loop: shared by flows, predictors, HVAE pretraining and fine-tuning."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-3
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.01
    warmup_steps: NonNegativeInt = 100
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: PositiveFloat = 350.0
    skip_grad_norm: PositiveFloat | None = None  # skip a step whose grad norm exceeds this
    skip_check_after: NonNegativeInt = 500  # norms are wild early: no norm-based skip before this
    max_skip_fraction: float = Field(0.1, gt=0.0, le=1.0)
    grad_accumulation: PositiveInt = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False
    tune_malloc: bool = True  # glibc: keep big buffers off mmap (about 2x fp32 CPU speed)
    checkpoint_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 50


class TrackingConfig(StrictModel):
    """Experiment trackers fed through Accelerate."""

    tensorboard: bool = False
