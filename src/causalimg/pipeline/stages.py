"""The real pipeline: data -> flows -> predictors -> pretrain -> finetune -> evaluate -> report.

Each stage reads exactly the config it hashes (``Stage.config``) and the files of its upstream
stages; see ``pipeline.stage`` for skipping, redoing and atomic completion. Stage graph:

  data ─┬─ flows ────────────────────────────┬─ finetune/<label> ── evaluate/<label> ─┐
        ├─ predictors/guidance-segmentor ────┤                                       ├─ report
        ├─ predictors/regressor ─────────────┤                                       │
        ├─ predictors/evaluation-segmentor ──┼───────────────────────────────────────┤
        └─ pretrain ─────────────────────────┘

The two segmentors train on disjoint halves of the training split with different seeds. Only the
guidance segmentor and the regressor reach fine-tuning (``GuidancePredictors``); the evaluation
segmentor is read by the evaluate stage alone.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from causalimg.config.loader import dump_config
from causalimg.config.sections import TrainConfig
from causalimg.core.guidance import GuidancePredictors
from causalimg.core.transform import VariableTransform
from causalimg.io import atomic_path, atomic_write_text, load_module, save_tensors
from causalimg.pipeline import components as build
from causalimg.pipeline.evaluation import EVALUATION_OUTPUTS, evaluate_strategy
from causalimg.pipeline.pretrain_check import check_pretrained
from causalimg.pipeline.reporting import write_run_report
from causalimg.pipeline.stage import Stage, StageContext, run_stages
from causalimg.plugins.manager import Registry
from causalimg.predictors.regressor import evaluate_mae, regressor_objective
from causalimg.predictors.unet import evaluate_dice, segmentor_objective
from causalimg.training.accelerator import make_accelerator
from causalimg.training.finetune import CounterfactualFineTuning, build_strategies, finetune_dscm, measure_nelbo
from causalimg.training.loop import fit

SEGMENTORS = ("guidance-segmentor", "evaluation-segmentor")
SPLITS = ("train", "val", "test")
DSCM_WEIGHTS = "dscm.safetensors"  # a fine-tuning stage's result: the whole DSCM (flows + image mechanism)

# Seed offsets: every trained network gets its own stream derived from run.seed.
SEED = {"flows": 1, "guidance-segmentor": 2, "evaluation-segmentor": 3, "regressor": 4, "pretrain": 5, "finetune": 6}


class ParentsOnly(Dataset):
    """The parents of a split as items ``{"parents": (P,)}``: what the flows train on."""

    def __init__(self, parents: torch.Tensor):
        self.parents = parents

    def __len__(self) -> int:
        return self.parents.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"parents": self.parents[i]}


def segmentor_half(n: int, which: str, seed: int) -> list[int]:
    """Disjoint halves of the training split for the two segmentors (one seeded permutation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    half = n // 2
    return sorted(perm[:half] if which == "guidance-segmentor" else perm[half:])


class Pipeline:
    """The stages of one run config, bound to a registry and a process group."""

    def __init__(self, config: Any, registry: Registry, accelerator: Any):
        self.config, self.registry, self.accelerator = config, registry, accelerator
        self.run_dir = Path(config.run.dir)
        self.seed = int(config.run.seed)

    # -- shared helpers -----------------------------------------------------------------------
    def section(self, *names: str) -> dict[str, Any]:
        dumped = self.config.model_dump(mode="json")
        return {name: dumped[name] for name in names}

    def source(self):
        return build.data_source(self.config, self.registry, self.run_dir / "data")

    def transform(self) -> VariableTransform:
        return build.load_transform(self.run_dir / "data")

    def train(self, model, objective, dataset, train: TrainConfig, ctx: StageContext, seed: int, **kw) -> dict:
        accelerator = make_accelerator(train, ctx.dir, tracking=self.config.tracking)
        result = fit(
            model, objective, dataset, train, ctx.dir, accelerator, seed=seed, desc=ctx.name, resume=True, **kw
        )
        return result.summary

    def seeded(self, body: Callable[[StageContext], Any]) -> Callable[[StageContext], Any]:
        """Seed the global RNGs from (run.seed, stage name) before the stage body, so what it builds
        (initial weights) does not depend on which stages ran earlier in this process: a run
        resumed after a kill skips finished stages and must still end bit-identical."""

        def run(ctx: StageContext) -> Any:
            seed = (self.seed * 1_000_003 + zlib.crc32(ctx.name.encode())) % 2**32
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            return body(ctx)

        return run

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main process, then on the others (so caches are written once)."""
        if self.accelerator.is_main_process:
            out = fn()
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            out = fn()
        return out

    # -- stage bodies -------------------------------------------------------------------------
    def data(self, ctx: StageContext) -> dict:
        def generate():
            source = self.source()
            for split in SPLITS:
                source.split(split)[0]  # a data set that generates on first use caches the split now
            return source

        source = self.main_first(generate)
        sizes = {split: len(source.split(split)) for split in SPLITS}
        if self.accelerator.is_main_process:
            transform = VariableTransform.fit(source.schema.names, build.split_parents(source.split("train")))
            with atomic_path(ctx.dir / build.TRANSFORM_FILE) as tmp:
                transform.save(tmp)
            atomic_write_text(ctx.dir / build.SCHEMA_FILE, source.schema.to_json())
        return {
            "sizes": sizes,
            "variables": list(source.schema.names),
            "region_names": list(source.schema.regions),
            "image_shape": list(source.image_shape),
            "spacing_mm": float(source.spacing_mm),
        }

    def flows(self, ctx: StageContext) -> dict:
        source, transform = self.source(), self.transform()
        dscm = build.dscm(self.config, self.registry, source, transform)
        parents = ParentsOnly(build.split_parents(source.split("train")))

        def objective(model, batch, step):
            return {"loss": -dscm.flow_log_prob(batch["parents"]).mean()}

        summary = self.train(
            dscm.attributes, objective, parents, self.config.flows_train, ctx, self.seed + SEED["flows"]
        )
        with torch.no_grad():
            dscm.cpu()
            test = build.split_parents(source.split("test"))
            summary["test_log_prob"] = float(dscm.flow_log_prob(test).mean())
        return summary

    def segmentor(self, ctx: StageContext) -> dict:
        which = ctx.name.split("/", 1)[1]
        source = self.source()
        train_split = source.split("train")
        seed = self.seed + SEED[which]
        half = Subset(train_split, segmentor_half(len(train_split), which, self.seed))
        model = build.segmentor(self.config, source.schema)
        summary = self.train(
            model, lambda m, b, s: segmentor_objective(m, b), half, self.config.predictors.segmentor.train, ctx, seed
        )
        summary["train_images"] = len(half)
        summary["test_dice"] = evaluate_dice(
            model, DataLoader(source.split("test"), batch_size=64), source.schema.classes
        )
        return summary

    def regressor(self, ctx: StageContext) -> dict:
        source, transform = self.source(), self.transform()
        model = build.regressor(self.config, len(transform.names))
        train = self.config.predictors.regressor.train

        def objective(m, batch, step):
            return regressor_objective(m, batch, transform)

        summary = self.train(model, objective, source.split("train"), train, ctx, self.seed + SEED["regressor"])
        summary["test_mae_mm2"] = evaluate_mae(model, DataLoader(source.split("test"), batch_size=64), transform)
        return summary

    def pretrain(self, ctx: StageContext) -> dict:
        source, transform = self.source(), self.transform()
        dscm = build.dscm(self.config, self.registry, source, transform)

        def objective(model, batch, step):
            pa = dscm.image_parents(transform.normalise(batch["parents"]))
            out = model.loss(batch["image"], pa)
            return {
                name: value.mean() for name, value in (("loss", out["nelbo"]), ("nll", out["nll"]), ("kl", out["kl"]))
            }

        summary = self.train(
            dscm.image, objective, source.split("train"), self.config.pretrain, ctx, self.seed + SEED["pretrain"]
        )
        if self.accelerator.is_main_process:  # fit leaves the EMA weights in the model
            summary.update(check_pretrained(dscm, transform, source.split("train"), source.split("test"), ctx.dir))
        return summary

    def finetune(self, ctx: StageContext) -> dict:
        """One strategy's CFT from the pretrained DSCM; No-CFT (no terms) writes it unchanged."""
        label = ctx.name.split("/", 1)[1]
        terms = self.config.finetune.strategies[label]
        source, transform = self.source(), self.transform()
        dscm = build.dscm(self.config, self.registry, source, transform)
        load_module(dscm.attributes, ctx.inputs["flows"] / build.WEIGHTS_FILE)
        load_module(dscm.image, ctx.inputs["pretrain"] / build.WEIGHTS_FILE)
        if not terms:  # No-CFT, the paper's baseline: the pretrained DSCM as it is
            self.save_dscm(dscm, ctx)
            return {"finetuned": False, "terms": []}
        predictors = GuidancePredictors(  # the evaluation segmentor is deliberately not loaded here
            segmentor=build.frozen_segmentor(self.config, source.schema, ctx.inputs["predictors/guidance-segmentor"]),
            regressor=build.frozen_regressor(self.config, ctx.inputs["predictors/regressor"], len(transform.names)),
        )
        strategies = build_strategies(terms, self.registry, predictors)
        fc, train_split = self.config.finetune, source.split("train")
        eps = measure_nelbo(dscm, DataLoader(train_split, batch_size=fc.train.batch_size), max_batches=8)
        cft = CounterfactualFineTuning(
            dscm, strategies, schema=source.schema, pixel_area_mm2=float(source.spacing_mm) ** 2,
            eps=eps, constraint=fc.constraint.kind, lagrange_lr=fc.constraint.lagrange_lr, damping=fc.constraint.damping,
            nelbo_weight=fc.constraint.weight, temperature=fc.temperature,
            interventions_per_step=fc.interventions_per_step, trainable=fc.trainable,
        )  # fmt: skip
        accelerator = make_accelerator(fc.train, ctx.dir, tracking=self.config.tracking)
        result = finetune_dscm(
            cft,
            train_split,
            fc.train,
            ctx.dir,
            accelerator,
            seed=self.seed + SEED["finetune"],
            resume=True,
            desc=ctx.name,
        )
        self.save_dscm(dscm, ctx)  # fit leaves the EMA weights in the model
        return {**result.summary, "finetuned": True, "terms": [t.name for t in terms], "eps_nelbo": eps}

    def save_dscm(self, dscm, ctx: StageContext) -> None:
        """The whole DSCM (flows + image mechanism): what the evaluate stage loads."""
        if self.accelerator.is_main_process:
            save_tensors(ctx.dir / DSCM_WEIGHTS, dscm.state_dict())
        self.accelerator.wait_for_everyone()

    def evaluate(self, ctx: StageContext) -> dict:
        label = ctx.name.split("/", 1)[1]
        source, transform = self.source(), self.transform()
        dscm = build.dscm(self.config, self.registry, source, transform)
        load_module(dscm, ctx.inputs[f"finetune/{label}"] / DSCM_WEIGHTS)
        evaluation_segmentor = build.frozen_segmentor(
            self.config, source.schema, ctx.inputs["predictors/evaluation-segmentor"]
        )
        return evaluate_strategy(dscm, evaluation_segmentor, source, self.config, self.registry, ctx, seed=self.seed)

    def report(self, ctx: StageContext) -> dict:
        labels = list(self.config.finetune.strategies)
        return write_run_report(
            ctx.dir, self.run_dir, labels, dump_config(self.config), [s.name for s in self.stages()], ctx.group
        )

    # -- the graph ----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        finetune = self.config.finetune.model_dump(mode="json")
        strategies = finetune.pop("strategies")
        evaluate = self.config.evaluate.model_dump(mode="json")
        seed = {"seed": self.seed}
        data = Stage("data", self.data, self.section("data", "regions"))
        stages = [
            data,
            Stage("flows", self.flows, {**self.section("flows", "flows_train"), **seed}, ("data",)),
            *(
                Stage(
                    f"predictors/{which}",
                    self.segmentor,
                    {"segmentor": self.section("predictors")["predictors"]["segmentor"], **seed},
                    ("data",),
                )
                for which in SEGMENTORS
            ),
            Stage(
                "predictors/regressor",
                self.regressor,
                {"regressor": self.section("predictors")["predictors"]["regressor"], **seed},
                ("data",),
            ),
            Stage("pretrain", self.pretrain, {**self.section("image_mechanism", "pretrain"), **seed}, ("data",)),
        ]
        upstream_ft = ("flows", "predictors/guidance-segmentor", "predictors/regressor", "pretrain")
        evaluations = []
        for label, terms in strategies.items():
            stages.append(
                Stage(f"finetune/{label}", self.finetune, {"finetune": finetune, "terms": terms, **seed}, upstream_ft)
            )
            evaluations.append(f"evaluate/{label}")
            stages.append(
                Stage(
                    f"evaluate/{label}",
                    self.evaluate,
                    {
                        "evaluate": evaluate,
                        "batch_size": finetune["train"]["batch_size"],
                        "outputs": EVALUATION_OUTPUTS,
                        **seed,
                    },
                    ("data", "flows", "predictors/evaluation-segmentor", f"finetune/{label}"),
                )
            )
        stages.append(Stage("report", self.report, {"config": self.config.model_dump(mode="json")}, tuple(evaluations)))
        return [replace(stage, run=self.seeded(stage.run)) for stage in stages]


def run_pipeline(
    config: Any, registry: Registry, accelerator: Any = None, only: str | None = None, start: str | None = None
) -> dict[str, Any]:
    """Run (or skip, or redo) every stage of ``config``; returns stage name -> result record.

    ``accelerator`` is the process group (an ``accelerate.Accelerator``); None makes one for a
    single process. ``only``/``start`` select a stage or group (``finetune``) as ``--only``/``--from``.
    """
    if accelerator is None:
        accelerator = make_accelerator(TrainConfig(), Path(config.run.dir))
    pipeline = Pipeline(config, registry, accelerator)
    log = print if accelerator.is_main_process else (lambda _: None)
    results = run_stages(pipeline.stages(), pipeline.run_dir, accelerator, only=only, start=start, log=log)
    return {name: result.as_dict() for name, result in results.items()}
