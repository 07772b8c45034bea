"""The pipeline of a run config: data -> flows -> predictors -> pretrain -> finetune -> evaluate -> report.

Stage graph (one finetune and one evaluate stage per strategy label)::

  data ─┬─ flows ────────────────────────────┬─ finetune/<label> ── evaluate/<label> ─┐
        ├─ predictors/guidance-segmentor ────┤                                       ├─ report
        ├─ predictors/regressor ─────────────┤                                       │
        ├─ predictors/evaluation-segmentor ──┼───────────────────────────────────────┤
        └─ pretrain ─────────────────────────┘

With ``compare_mechanisms`` the pretrain, finetune and evaluate stages repeat per image mechanism,
labelled by it (``pretrain/<mechanism>``, ``finetune/<mechanism>/<label>``); data, flows and
predictors are shared.

Each stage module declares what it reads of the config; ``declare`` turns that declaration into
the stage's hash (``pipeline.reads.select``) and into the guarded view its body gets, and seeds
every random generator from (run.seed, stage name) before the body, so what a stage builds does
not depend on which stages ran before it in this process (a resumed run ends bit-identical).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from causalimg.builder import Builder
from causalimg.config.run import RunConfig, finetune_entry, finetune_settings_path, mechanism_paths, runs_on
from causalimg.config.sections import TrainConfig
from causalimg.pipeline import reads as config_reads
from causalimg.pipeline.stage import ProcessGroup, Stage, StageContext, run_stages
from causalimg.pipeline.stages import data, evaluate, finetune, flows, predictors, pretrain, report
from causalimg.pipeline.stages.base import Step
from causalimg.plugins.manager import Registry
from causalimg.training.accelerator import make_accelerator
from causalimg.training.distributed import seed_everything

Body = Callable[[Step], dict[str, Any]]
SEED_READ = "run.seed"  # every stage reads it: its random generators are seeded from it


def stage_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


class Graph:
    """Declares the stages of one run config, bound to a registry and a process group."""

    def __init__(self, config: RunConfig, registry: Registry, group: ProcessGroup):
        self.config, self.registry, self.group = config, registry, group
        self.stages: list[Stage] = []

    def declare(
        self,
        name: str,
        body: Body,
        reads: Sequence[str],
        upstream: Sequence[str] = (),
        extra: Any = None,
        mechanism: str = "image_mechanism",
        seed_name: str | None = None,
    ) -> None:
        """Add a stage whose hash covers exactly ``reads`` (+ ``extra``, e.g. the files it writes);
        its builder builds the image mechanism at config path ``mechanism`` (fine-tuned with that
        mechanism's settings); its generators are seeded from ``seed_name`` (default: its name), so
        every mechanism sees the same batches."""
        declared = tuple(dict.fromkeys([*reads, SEED_READ]))
        label = {path: label for label, path in mechanism_paths(self.config).items()}[mechanism]
        tuned_as = finetune_entry(self.config, label)
        payload = {"reads": config_reads.select(self.config, declared), "extra": extra}
        config, registry, tracking = self.config, self.registry, self.config.tracking
        names = lambda: tuple(s.name for s in self.stages)  # noqa: E731 (the list is complete when bodies run)

        def run(ctx: StageContext) -> dict[str, Any]:
            view = config_reads.view(config, declared, name)
            seed_everything(stage_seed(config.run.seed, seed_name or name))
            return body(Step(ctx, view, Builder(view, registry, mechanism, tuned_as), tracking, names()))

        self.stages.append(Stage(name, run, payload, tuple(upstream)))


def pipeline_stages(config: RunConfig, registry: Registry, group: ProcessGroup) -> list[Stage]:
    """Every stage of ``config`` in run order."""
    graph = Graph(config, registry, group)
    graph.declare("data", data.run, data.READS)
    graph.declare("flows", flows.run, flows.READS, ("data",))
    for which in predictors.SEGMENTORS:
        graph.declare(f"predictors/{which}", predictors.run_segmentor, predictors.SEGMENTOR_READS, ("data",))
    graph.declare("predictors/regressor", predictors.run_regressor, predictors.REGRESSOR_READS, ("data",))
    evaluations = []
    for mechanism, path in mechanism_paths(config).items():
        under = "" if mechanism is None else f"/{mechanism}"
        graph.declare(f"pretrain{under}", pretrain.run, pretrain.reads(path), ("data",), mechanism=path,
                      seed_name="pretrain")  # fmt: skip
        for label in (s for s in config.finetune.strategies if runs_on(config, mechanism, s)):
            tuned, at_sampling = f"finetune{under}/{label}", label in config.finetune.sampling_time
            if at_sampling or not config.finetune.strategies[label]:  # No-CFT, or terms that steer evaluate
                keep = finetune.keep_for_sampling if at_sampling else finetune.keep_pretrained
                graph.declare(tuned, keep, finetune.untrained_reads(path), finetune.upstream(f"pretrain{under}"),
                              mechanism=path, seed_name=f"finetune/{label}")  # fmt: skip
            else:
                settings = finetune_settings_path(config, mechanism)
                graph.declare(tuned, finetune.run, finetune.reads(label, path, settings),
                              finetune.upstream(f"pretrain{under}"), mechanism=path, seed_name=f"finetune/{label}")  # fmt: skip
            graph.declare(f"evaluate{under}/{label}", evaluate.run_sampling_time if at_sampling else evaluate.run,
                          evaluate.reads(path, label if at_sampling else None), evaluate.upstream(tuned, at_sampling),
                          extra={"outputs": evaluate.OUTPUTS}, mechanism=path, seed_name=f"evaluate/{label}")  # fmt: skip
            evaluations.append(f"evaluate{under}/{label}")
    graph.declare("report", report.run, report.READS, ("data", *evaluations))
    return graph.stages


def run_pipeline(
    config: RunConfig,
    registry: Registry,
    accelerator: Any = None,
    only: str | None = None,
    start: str | None = None,
) -> dict[str, Any]:
    """Run (or skip, or redo) every stage of ``config``; returns stage name -> result record.

    ``accelerator`` is the process group (an ``accelerate.Accelerator``); None makes one for a
    single process. ``only``/``start`` select a stage or group (``finetune``) as ``--only``/``--from``.
    """
    if accelerator is None:
        accelerator = make_accelerator(TrainConfig(), Path(config.run.dir))
    log = print if accelerator.is_main_process else (lambda _: None)
    stages = pipeline_stages(config, registry, accelerator)
    results = run_stages(stages, Path(config.run.dir), accelerator, only=only, start=start, log=log)
    return {name: result.as_dict() for name, result in results.items()}
