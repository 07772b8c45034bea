"""The one training loop: flows, predictors, HVAE pretraining and counterfactual fine-tuning all use it.

Lifecycle of ``fit`` (docs/training.md has the long version):

1. check the output folder takes files and has room; resume from its latest complete checkpoint
   (``resume=True``) or refuse to overwrite one;
2. each step: seed from (seed, rank, step), linear warm-up of the learning rate, ``grad_accumulation``
   micro-batches through ``objective`` (under Accelerate's autocast), one all-reduce that averages the
   gradients and carries every rank's error and non-finite-loss flags, clip, then either an AdamW step
   plus an EMA update or a counted skip (non-finite loss, non-finite gradient norm, or a norm above
   ``skip_grad_norm`` after ``skip_check_after`` steps);
3. every ``checkpoint_every`` steps and at the end a checkpoint (``training.checkpoint``);
4. at the end the EMA weights go into ``model`` and ``weights.safetensors``; ``summary.json`` last.

Gradients are averaged by one explicit all-reduce rather than DistributedDataParallel: an objective
may call any method of the model (abduct, predict, ...), not only ``forward``, and a rank whose
objective raised still joins the same collective, so every rank stops with its error and none hangs.
Data order depends only on (seed, epoch, step), so a resumed run sees the batches the uninterrupted
run would have seen and ends with bit-identical weights (fp32 on CPU).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, recursively_apply, send_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from causalimg import io
from causalimg.config.sections import TrainConfig
from causalimg.errors import CausalImgError, DataError, TrainingError
from causalimg.training import checkpoint as ckpt
from causalimg.training.distributed import seed_everything
from causalimg.training.ema import EMA

Objective = Callable[[nn.Module, Any, int], Mapping[str, Tensor]]
"""``objective(model, batch, step) -> {"loss": scalar tensor, other metrics...}``."""

WEIGHTS_FILE = "weights.safetensors"
SUMMARY_FILE = "summary.json"
MIN_STEPS_FOR_SKIP_STOP = 20  # the skip fraction is judged only once this many steps have run
FP16_OVERFLOW = "fp16 overflow"  # the gradient scaler's normal search for its scale: not a failure

logger = logging.getLogger("causalimg.training")


@dataclass(frozen=True)
class _Outcome:
    """One step: why it was skipped (None: taken), loss averaged over ranks, gradient norm, and the
    objective's other scalar outputs (this process's, averaged over micro-batches)."""

    skipped: str | None
    loss: float
    grad_norm: float
    metrics: dict[str, float]


class Stateful(Protocol):
    def state_dict(self) -> Mapping[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True)
class TrainResult:
    """Where the EMA weights were saved and what ``summary.json`` says."""

    weights: Path
    summary: dict[str, Any]


def warmup_lr(step: int, config: TrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear from lr / warmup_steps up to lr, then constant."""
    if config.warmup_steps == 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def make_adamw(parameters: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with ``config``'s settings, fused into one kernel over all tensors where torch has one.

    The fused kernel does the same update as the per-tensor one without ~8 small ops per tensor:
    about 10 % of a paper-preset HVAE step on a CPU. Other devices or dtypes get the default.
    """
    supported = ("cpu", "cuda", "xpu", "mps")
    fused = bool(parameters) and all(p.device.type in supported and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(
        parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=fused or None
    )


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class _EpochBatches(Sampler[list[int]]):
    """This rank's batches of one epoch: a seeded permutation cut into global batches.

    Global batch g holds items ``perm[g*B*W : (g+1)*B*W]``; rank r takes its r-th slice of B. The
    last incomplete global batch is dropped, so all ranks run the same number of equal batches.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int, start: int) -> None:
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=generator).tolist()
        per_global = self.batch_size * self.world
        for g in range(self.start, self.n // per_global):
            first = g * per_global + self.rank * self.batch_size
            yield perm[first : first + self.batch_size]


def _batches(
    dataset: Dataset,
    config: TrainConfig,
    accelerator: Accelerator,
    seed: int,
    start: int,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> Generator[Any, None, None]:
    """Endless stream of this rank's micro-batches on the device, beginning at micro-batch ``start``."""
    n, world = len(dataset), accelerator.num_processes  # type: ignore[arg-type]
    per_epoch = n // (config.batch_size * world)
    if per_epoch == 0:
        raise DataError(
            f"the training set has {n} items, fewer than one batch of train.batch_size={config.batch_size} "
            f"on each of {world} processes"
        )
    epoch, offset = divmod(start, per_epoch)
    while True:
        sampler = _EpochBatches(n, config.batch_size, world, accelerator.process_index, seed, epoch, offset)
        # Its own generator: a DataLoader otherwise draws from the global RNG, which is seeded per step.
        generator = torch.Generator().manual_seed(_derive_seed(seed, epoch, accelerator.process_index))
        for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, generator=generator):
            batch = send_to_device(batch, accelerator.device)
            if config.channels_last:
                batch = recursively_apply(
                    lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t, batch
                )
            yield batch
        epoch, offset = epoch + 1, 0


def _agree(accelerator: Accelerator, error: BaseException | None, what: str) -> None:
    """Collective check: if any rank failed at ``what``, every rank raises, naming the failed ranks.

    The failing rank re-raises its own exception; the others raise TrainingError with its message.
    """
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:
        return
    _raise_rank_failure(accelerator, error, what)


def _raise_rank_failure(accelerator: Accelerator, error: BaseException | None, what: str) -> None:
    mine = None if error is None else f"{type(error).__name__}: {error}"
    messages = gather_object([mine])
    if error is not None:
        raise error
    failed = "; ".join(f"rank {rank}: {msg}" for rank, msg in enumerate(messages) if msg is not None)
    raise TrainingError(f"{what} failed on another process ({failed}); this process stopped too")


def _check_resumable(state: Mapping[str, Any], config: TrainConfig, seed: int, where: Path) -> None:
    saved, now = state["train_config"], config.model_dump(mode="json")
    changed = sorted(k for k in now if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed or state["seed"] != seed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        if state["seed"] != seed:
            detail = ", ".join(filter(None, [detail, f"seed: {state['seed']} -> {seed}"]))
        raise TrainingError(
            f"{where} was written with another training config ({detail}); resuming it would not "
            "reproduce the run: restore those values or train into a new run folder"
        )


class _Trainer:
    """State of one ``fit`` call; methods are the steps of the lifecycle in the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainConfig,
        out_dir: Path,
        accelerator: Accelerator,
        seed: int,
        extra_state: Sequence[Stateful],
        trainable: list[nn.Parameter],
        desc: str,
    ) -> None:
        self.model, self.objective, self.config, self.out_dir = model, objective, config, out_dir
        self.acc, self.seed, self.desc = accelerator, seed, desc
        self.extra_state, self.trainable = extra_state, trainable
        self.optimizer = accelerator.prepare_optimizer(make_adamw(trainable, config))
        self.ema = EMA(model, config.ema_decay)
        self.step = 0
        self.skips: dict[str, int] = {}
        self.wall_s = 0.0  # training time of earlier sessions of this run (resumed runs)
        self.resumed_from: int | None = None
        self.recent: list[dict[str, float]] = []  # loss and metrics of the last log_every taken steps

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, session_s: float) -> None:
        tmp, final = ckpt.staging_dir(self.out_dir, self.step)
        error: BaseException | None = None
        try:
            if self.acc.is_main_process:
                tmp.mkdir(parents=True, exist_ok=True)
            self.acc.wait_for_everyone()
            self.acc.save_state(str(tmp))  # optimizer (and scaler) on the main process, RNG per rank
        except Exception as err:
            error = err
        _agree(self.acc, error, f"{self.desc}: writing checkpoint {final}")
        if self.acc.is_main_process:
            try:
                io.save_tensors(tmp / ckpt.MODEL_FILE, self.model.state_dict())
                io.save_tensors(tmp / ckpt.EMA_FILE, self.ema.state_dict())
                for i, obj in enumerate(self.extra_state):
                    io.save_tensors(tmp / f"extra_{i}.safetensors", obj.state_dict())
                ckpt.write_state(tmp, self._state(session_s))
                ckpt.publish(tmp, final, self.config.keep_checkpoints)
            except Exception as err:
                kept = ckpt.list_checkpoints(self.out_dir)
                error = TrainingError(
                    f"{self.desc}: could not write checkpoint {final} "
                    f"({err.strerror if isinstance(err, OSError) and err.strerror else err}); "
                    f"the last good checkpoint {kept[-1] if kept else '(none)'} is untouched"
                )
                error.__cause__ = err
        _agree(self.acc, error, f"{self.desc}: writing checkpoint {final}")

    def _state(self, session_s: float) -> dict[str, Any]:
        return {
            "step": self.step,
            "skips": self.skips,
            "wall_s": self.wall_s + session_s,
            "seed": self.seed,
            "world_size": self.acc.num_processes,
            "train_config": self.config.model_dump(mode="json"),
            "recent": self.recent,
            "desc": self.desc,
        }

    def load_checkpoint(self, path: Path) -> None:
        if not (path / ckpt.MODEL_FILE).is_file():
            raise DataError(f"{path}: no {ckpt.MODEL_FILE}; checkpoints are read from safetensors only")
        state = ckpt.read_state(path)
        _check_resumable(state, self.config, self.seed, path)
        try:
            self.acc.load_state(str(path))  # optimizer: torch.load(weights_only=True)
        except Exception as err:
            raise DataError(f"{path}: optimizer state could not be read safely ({err})") from err
        io.load_module(self.model, path / ckpt.MODEL_FILE)
        self.ema.load_state_dict(io.load_tensors(path / ckpt.EMA_FILE))
        for i, obj in enumerate(self.extra_state):
            obj.load_state_dict(io.load_tensors(path / f"extra_{i}.safetensors"))
        self.step, self.skips, self.wall_s = int(state["step"]), dict(state["skips"]), float(state["wall_s"])
        self.recent, self.resumed_from = list(state["recent"]), self.step
        if state["world_size"] != self.acc.num_processes:
            logger.warning(
                "%s: resuming a %d-process run on %d processes: the data order differs",
                self.desc,
                state["world_size"],
                self.acc.num_processes,
            )

    # -- one optimiser step --------------------------------------------------------------------
    def train_step(self, batches: Iterator[Any]) -> _Outcome:
        cfg, acc = self.config, self.acc
        seed_everything(_derive_seed(self.seed, acc.process_index, self.step))
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_lr(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        error: BaseException | None = None
        loss_sum, finite, metrics = 0.0, True, dict[str, float]()
        for _ in range(cfg.grad_accumulation):
            if error is not None:
                break
            try:
                batch = next(batches)
                if not finite:
                    continue  # read but unused: keeps the data stream aligned with the step count
                with acc.autocast():
                    out = self.objective(self.model, batch, self.step)
                loss = out["loss"] if isinstance(out, Mapping) and "loss" in out else None
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TrainingError(f"{self.desc}: the objective must return a dict with a scalar 'loss' tensor")
                value = loss.detach().float().item()
                if not math.isfinite(value):
                    finite = False
                    continue
                loss_sum += value
                for key, metric in out.items():
                    if key != "loss" and isinstance(metric, Tensor) and metric.numel() == 1:
                        metrics[key] = metrics.get(key, 0.0) + metric.detach().float().item() / cfg.grad_accumulation
                acc.backward(loss / cfg.grad_accumulation)
            except Exception as err:
                error = err
        finite, mean_loss = self._sync_gradients(error, finite, loss_sum / cfg.grad_accumulation)
        if not finite:
            return _Outcome(self._skip("non-finite loss"), mean_loss, math.nan, metrics)
        norm = float(acc.clip_grad_norm_(self.trainable, cfg.grad_clip))
        if not math.isfinite(norm):
            reason = FP16_OVERFLOW if acc.scaler is not None else "non-finite gradient"
            return _Outcome(self._skip(reason), mean_loss, norm, metrics)
        if cfg.skip_grad_norm is not None and self.step >= cfg.skip_check_after and norm > cfg.skip_grad_norm:
            return _Outcome(self._skip("gradient norm above skip_grad_norm"), mean_loss, norm, metrics)
        self.optimizer.step()
        self.ema.update(self.model)
        return _Outcome(None, mean_loss, norm, metrics)

    def _sync_gradients(self, error: BaseException | None, finite: bool, loss: float) -> tuple[bool, float]:
        """One all-reduce of averaged gradients and [failed ranks, non-finite ranks, loss sum].

        Returns whether every rank's loss was finite and the loss averaged over ranks.
        """
        acc = self.acc
        if acc.num_processes == 1:
            if error is not None:
                raise error
            return finite, loss if finite else math.nan
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flags = torch.tensor(
            [float(error is not None), float(not finite), loss if finite else 0.0],
            device=acc.device,
            dtype=torch.float32,
        )
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads] + [flags])  # (n_params + 3,)
        flat = acc.reduce(flat, reduction="sum")
        failed, nonfinite, loss_total = flat[-3:].tolist()
        if failed:
            _raise_rank_failure(acc, error, f"{self.desc} step {self.step}")
        flat = flat[:-3] / acc.num_processes
        offset = 0
        for p, g in zip(self.trainable, grads):
            chunk = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
        if nonfinite:
            return False, math.nan
        return True, loss_total / acc.num_processes

    def _skip(self, reason: str) -> str:
        self.optimizer.zero_grad(set_to_none=True)
        if self.acc.scaler is not None and self.acc.scaler._per_optimizer_states:  # fp16: lower the scale
            self.acc.scaler.update()
        self.skips[reason] = self.skips.get(reason, 0) + 1
        return reason

    def check_skip_fraction(self) -> None:
        skipped = sum(n for reason, n in self.skips.items() if reason != FP16_OVERFLOW)
        ran = self.step
        if ran >= MIN_STEPS_FOR_SKIP_STOP and skipped > self.config.max_skip_fraction * ran:
            kept = ckpt.list_checkpoints(self.out_dir)
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skips.items()))
            raise TrainingError(
                f"{self.desc}: {skipped} of {ran} steps skipped ({reasons}), more than "
                f"train.max_skip_fraction={self.config.max_skip_fraction}; stopping. The last good checkpoint "
                f"is {kept[-1] if kept else '(none yet)'}. Try a lower train.lr, a longer warm-up or a "
                "higher train.skip_grad_norm"
            )


@torch.no_grad()
def to_channels_last(parameters: Iterable[nn.Parameter]) -> None:
    """The channels-last layout for the 4-D parameters that train; frozen parts (fine-tuning's
    predictors) keep theirs, where their narrow GroupNorms run faster."""
    for p in parameters:
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def fit(
    model: nn.Module,
    objective: Objective,
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    accelerator: Accelerator,
    *,
    seed: int,
    extra_state: Sequence[Stateful] = (),
    parameters: Iterable[nn.Parameter] | None = None,
    desc: str = "train",
    resume: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    weights_prefix: str = "",
) -> TrainResult:
    """Train ``model`` on ``objective`` for ``config.steps`` optimiser steps; return the EMA weights.

    ``objective(model, batch, step)`` gets the plain model (any method may be called) and a batch on
    the device, and returns a dict with a scalar ``"loss"``. ``parameters`` restricts what is optimised
    (the rest is frozen for the run); ``extra_state`` objects (``state_dict``/``load_state_dict`` of
    tensors and numbers, e.g. a Lagrange multiplier) are checkpointed alongside. Steps skipped for a
    non-finite loss or gradient still count as steps. On return ``model`` holds the EMA weights.
    Outputs in ``out_dir``: ``checkpoints/step_<n>/``, ``weights.safetensors`` (the EMA weights; with
    ``weights_prefix`` only those of the submodule under it, prefix stripped), ``summary.json``.
    """
    out_dir = Path(out_dir)
    if accelerator.gradient_accumulation_steps != 1:
        raise TrainingError(
            "fit accumulates gradients itself (train.grad_accumulation): make the Accelerator "
            "with gradient_accumulation_steps=1 (make_accelerator does)"
        )
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:  # room for the kept checkpoints plus one being written: model, EMA, two AdamW moments
            need = 4 * ckpt.model_bytes(model) * (config.keep_checkpoints + 1) + 2 * ckpt.model_bytes(model)
            ckpt.check_writable(out_dir, need)
            ckpt.remove_partial(out_dir)
        except (CausalImgError, OSError) as err:
            error = err
    _agree(accelerator, error, f"{desc}: checking {out_dir}")

    chosen = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    wanted = {id(p) for p in chosen}
    was_trainable = {id(p): p.requires_grad for p in model.parameters()}
    trainable = [p for p in model.parameters() if id(p) in wanted]  # model order, tied weights once
    if len({id(p) for p in trainable}) != len(wanted):
        raise TrainingError(f"{desc}: some of the parameters to optimise do not belong to the model")
    if not trainable:
        raise TrainingError(f"{desc}: no parameters to optimise")
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    model.to(accelerator.device)
    if config.channels_last:
        to_channels_last(trainable)
    try:
        return _run(
            weights_prefix,
            model,
            objective,
            dataset,
            config,
            out_dir,
            accelerator,
            seed,
            extra_state,
            trainable,
            desc,
            resume,
            collate_fn,
        )
    finally:
        for p in model.parameters():
            p.requires_grad_(was_trainable[id(p)])


def _run(
    weights_prefix: str,
    model: nn.Module,
    objective: Objective,
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    accelerator: Accelerator,
    seed: int,
    extra_state: Sequence[Stateful],
    trainable: list[nn.Parameter],
    desc: str,
    resume: bool,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> TrainResult:
    if accelerator.num_processes > 1:  # every rank starts from rank 0's weights
        with torch.no_grad():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
    trainer = _Trainer(model, objective, config, out_dir, accelerator, seed, extra_state, trainable, desc)
    latest = ckpt.list_checkpoints(out_dir)
    if latest and not resume:
        raise TrainingError(
            f"{out_dir} holds checkpoints up to {latest[-1].name} from an earlier run: pass --resume to "
            "continue it, or choose a new run folder (nothing was overwritten)"
        )
    error: BaseException | None = None
    if latest:
        try:
            trainer.load_checkpoint(latest[-1])
        except Exception as err:
            error = err
        _agree(accelerator, error, f"{desc}: resuming from {latest[-1]}")

    if accelerator.trackers == [] and accelerator.log_with:
        flat = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in config.model_dump(mode="json").items()
        }
        accelerator.init_trackers(desc, config=flat)
    batches = _batches(dataset, config, accelerator, seed, trainer.step * config.grad_accumulation, collate_fn)
    images_per_step = config.batch_size * config.grad_accumulation * accelerator.num_processes
    start_step, started = trainer.step, time.perf_counter()
    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        desc=desc,
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    try:
        while trainer.step < config.steps:
            outcome = trainer.train_step(batches)
            trainer.step += 1
            if outcome.skipped is None:
                trainer.recent = ([*trainer.recent, {"loss": outcome.loss, **outcome.metrics}])[-config.log_every :]
            elif accelerator.is_main_process:
                logger.warning(
                    "%s step %d skipped: %s (loss %.4g, gradient norm %.4g)",
                    desc,
                    trainer.step,
                    outcome.skipped,
                    outcome.loss,
                    outcome.grad_norm,
                )
            trainer.check_skip_fraction()
            elapsed = time.perf_counter() - started
            rate = (trainer.step - start_step) * images_per_step / max(elapsed, 1e-9)
            skipped = sum(trainer.skips.values())
            bar.set_postfix(loss=f"{outcome.loss:.4g}", img_s=f"{rate:.1f}", skipped=skipped, refresh=False)
            bar.update(1)
            if accelerator.trackers and trainer.step % config.log_every == 0:
                accelerator.log(
                    {
                        "loss": outcome.loss,
                        **outcome.metrics,
                        "grad_norm": outcome.grad_norm,
                        "lr": warmup_lr(trainer.step - 1, config),
                        "images_per_s": rate,
                        "skipped": skipped,
                    },
                    step=trainer.step,
                )
            if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
                trainer.save_checkpoint(time.perf_counter() - started)
    finally:
        bar.close()
        batches.close()

    session_s = time.perf_counter() - started
    trainer.ema.copy_to(model)
    weights = out_dir / WEIGHTS_FILE
    final = {
        k: float(np.mean([r[k] for r in trainer.recent if k in r]))
        for k in dict.fromkeys(k for r in trainer.recent for k in r)
    }  # mean over the last log_every steps
    summary = {
        "desc": desc,
        "steps": trainer.step,
        "skipped_steps": sum(trainer.skips.values()),
        "skip_reasons": trainer.skips,
        "final_loss": final.get("loss"),
        "final_metrics": {k: v for k, v in final.items() if k != "loss"},
        "wall_time_s": trainer.wall_s + session_s,
        "session_time_s": session_s,
        "images_per_s": (trainer.step - start_step) * images_per_step / max(session_s, 1e-9),
        "resumed_from_step": trainer.resumed_from,
        "world_size": accelerator.num_processes,
        "mixed_precision": config.mixed_precision,
        "weights": WEIGHTS_FILE,
    }
    error = None
    if accelerator.is_main_process:
        try:
            shadow = trainer.ema.shadow
            io.save_tensors(
                weights, {k[len(weights_prefix) :]: v for k, v in shadow.items() if k.startswith(weights_prefix)}
            )
            io.atomic_write_json(out_dir / SUMMARY_FILE, summary)  # last: marks the stage complete
        except OSError as err:
            error = TrainingError(f"{desc}: could not write {weights} ({err.strerror or err})")
    _agree(accelerator, error, f"{desc}: writing {weights}")
    if accelerator.trackers:
        accelerator.end_training()
    return TrainResult(weights=weights, summary=summary)
