"""The fixed (non-plugin) sections of a run config. Plugin sections are added by ``config.run``.

A section's defaults never depend on which of its fields a config gives: a section with other
defaults than the generic one (``flows_train``, ``finetune.train``) is a class of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from causalimg.predictors.configs import RegressorConfig, SegmentorConfig
from causalimg.strict import Seed, StrictModel

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

    # How a run is carried out, not what it computes: unhashed (see ``StrictModel.OPERATIONAL``) and
    # free to change when a run is resumed (as is ``steps``, to train longer).
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset(
        {"log_every", "checkpoint_every", "keep_checkpoints", "tune_malloc"}
    )
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = OPERATIONAL | {"steps"}

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


class FlowsTrainConfig(TrainConfig):
    """Training of the attribute flows: small models, big batches."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 3e-3
    warmup_steps: NonNegativeInt = 50
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)


class FinetuneTrainConfig(TrainConfig):
    """Counterfactual fine-tuning of a pretrained image mechanism: a smaller learning rate."""

    lr: PositiveFloat = 1e-4


class TrackingConfig(StrictModel):
    """Experiment trackers fed through Accelerate."""

    tensorboard: bool = False


class ConstraintConfig(StrictModel):
    """How fine-tuning keeps the factual likelihood: a damped Lagrangian on the nelbo, or a fixed weight."""

    kind: Literal["lagrangian", "fixed"] = "lagrangian"
    lagrange_lr: PositiveFloat = 0.05
    damping: NonNegativeFloat = 10.0
    weight: NonNegativeFloat = 1.0  # the nelbo's weight when kind is "fixed"


class MechanismFinetuneConfig(StrictModel):
    """How one image mechanism of a comparison is fine-tuned, where it differs from ``finetune``:
    its optimisation and its constraint. Fields it leaves out are taken from ``finetune.train`` and
    ``finetune.constraint`` when the config is read, so a resolved config shows every value used."""

    train: FinetuneTrainConfig = FinetuneTrainConfig()
    constraint: ConstraintConfig = ConstraintConfig()


class SamplingTimeConfig(StrictModel):
    """A strategy whose guidance terms steer the image mechanism while it predicts, instead of
    fine-tuning it: every velocity evaluation moves down the gradient of the terms' loss on the
    image it heads for (image mechanisms with ``GuidedPrediction``, such as ``flow-matching``)."""

    scale: PositiveFloat = 1.0  # v <- v - scale * grad_x(loss of the image x + (1 - t) v), per image
    # the image mechanisms it steers, by run label (image_mechanism's plugin name or a
    # compare_mechanisms label); None: every mechanism of the run
    mechanisms: list[str] | None = Field(None, min_length=1)


class SegmentorSection(SegmentorConfig):
    """The frozen segmentors (guidance and evaluation): the U-Net's size and its training."""

    train: TrainConfig = TrainConfig()


class RegressorSection(RegressorConfig):
    """The frozen regressor of Reg-CFT: a timm model that predicts every variable, and its training."""

    train: TrainConfig = TrainConfig()


class PredictorsSection(StrictModel):
    """Predictors trained on factual data before fine-tuning, then frozen."""

    segmentor: SegmentorSection = SegmentorSection()
    regressor: RegressorSection = RegressorSection()


class FigureConfig(StrictModel):
    """Figure 1: each strategy's counterfactuals when one structure grows by ``change`` in each region in turn.

    The defaults are the paper's (+20 mm^2 of calcified plaque, the phantom's first structure).
    """

    structure: str | None = None  # a structure of the data set; None: its first
    change: float = 20.0  # in the structure's unit, clipped to each variable's support


class ReportSection(StrictModel):
    """What the report checks and shows; the defaults are the paper's."""

    figure: FigureConfig = FigureConfig()
    # strategy labels whose intervened-region errors should increase in this order (the paper's claim);
    # the report counts the interventions where they do, when all of them ran
    ordering: tuple[str, ...] = ("positional-segmentor", "regressor", "none")
    # metrics whose per-intervention, per-region errors make a Table 1 each
    tables: tuple[str, ...] = ("effectiveness", "ground-truth")
