"""The run entry point: ``python -m causalimg.run --config X`` or ``accelerate launch -m causalimg.run``.

Every rank runs :func:`main`: it validates the config (plugins included) before anything is built,
writes the resolved config to ``run.dir/config.yaml`` (main process only, atomically) and runs
the stages in ``STAGES`` order. Fine-tuning runs once per strategy label of the config.
Launched as a program, it first moves onto tcmalloc when the system has it (``causalimg.tcmalloc``;
``CAUSALIMG_TCMALLOC=0`` opts out), before torch is imported.
"""

from __future__ import annotations

from causalimg.tcmalloc import loaded as tcmalloc_loaded
from causalimg.tcmalloc import preload_tcmalloc

if __name__ == "__main__":  # re-executes this command on tcmalloc, once, before torch loads
    preload_tcmalloc()

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from causalimg.cli import add_config_arguments, report_errors
from causalimg.config.loader import dump_config, load_config
from causalimg.config.run import strategy_labels
from causalimg.errors import ConfigError
from causalimg.io import atomic_write_text
from causalimg.pipeline.lock import hold_run_folder
from causalimg.plugins.manager import load_registry

STAGES: tuple[str, ...] = ("data", "flows", "predictors", "pretrain", "finetune", "evaluate", "report")
RESOLVED_CONFIG = "config.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m causalimg.run",
        description="Validate a config, save the resolved config in run.dir and run the stages.",
    )
    add_config_arguments(parser, flag=True)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", choices=STAGES, metavar="STAGE", help=f"run one stage ({', '.join(STAGES)})")
    which.add_argument(
        "--from", dest="start", choices=STAGES, metavar="STAGE", help="run this stage and the ones after it"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in run.dir with the same config")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    return parser


def select_stages(only: str | None = None, start: str | None = None) -> tuple[str, ...]:
    """The stages to run, in order: all, one (``--only``) or a suffix (``--from``)."""
    if only is not None:
        return (only,)
    return STAGES[STAGES.index(start) :] if start is not None else STAGES


def plan(config: Any, stages: Sequence[str]) -> list[str]:
    """One line per stage run; fine-tuning once per strategy label."""
    lines = []
    for stage in stages:
        if stage == "finetune":
            lines += [f"finetune[{label}]" for label in strategy_labels(config)]
        else:
            lines.append(stage)
    return lines


def is_main_process() -> bool:
    """Rank 0 of a launch (``RANK`` is set by ``accelerate launch`` / torchrun), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def check_resume(run_dir: Path, resolved: str) -> None:
    """Resuming needs the run's saved config, unchanged: a changed config is a new run.

    ``run.dir`` is left out of the comparison: the folder is where the run is, so a run folder
    that was moved or copied resumes where it lies.
    """
    saved = run_dir / RESOLVED_CONFIG
    if not saved.is_file():
        raise ConfigError(f"--resume: {str(saved)!r} does not exist; there is no run to resume in {str(run_dir)!r}")

    def without_dir(text: str) -> object:
        data = yaml.safe_load(text)
        if isinstance(data, dict) and isinstance(data.get("run"), dict):
            data["run"].pop("dir", None)
        return data

    if without_dir(saved.read_text()) != without_dir(resolved):
        raise ConfigError(
            f"--resume: the config differs from the one saved in {str(saved)!r}; "
            "use a new run.dir or drop --resume to start over"
        )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    resolved = dump_config(config)
    run_dir = Path(config.run.dir)
    from causalimg.preflight import preflight  # torch and the plugins: only for a config that parsed

    registry = load_registry(config.plugins.dirs)
    notes = preflight(config, registry)  # everything knowable before a stage runs: no run folder for a bad config
    if is_main_process():
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    with hold_run_folder(run_dir) if is_main_process() else contextlib.nullcontext():
        return run_locked(args, config, registry, resolved)


def run_locked(args: argparse.Namespace, config: Any, registry: Any, resolved: str) -> int:
    """The run, once this process holds the run folder."""
    run_dir = Path(config.run.dir)
    if args.resume:
        check_resume(run_dir, resolved)
    if is_main_process():
        try:  # the first write: an unusable run.dir is reported before anything runs
            atomic_write_text(run_dir / RESOLVED_CONFIG, resolved)
        except OSError as err:
            raise ConfigError(f"run.dir {str(run_dir)!r} is not writable: {err.strerror or err}") from None
        steps = plan(config, select_stages(args.only, args.start))
        malloc = "tcmalloc" if tcmalloc_loaded() else "system malloc"
        print(f"run {run_dir} (seed {config.run.seed}{', resuming' if args.resume else ''}, {malloc})")
        print("\n".join(f"  {i}. {step}" for i, step in enumerate(steps, start=1)))
    if args.dry_run:
        return 0
    from causalimg.config.sections import TrainConfig  # the heavy imports (torch) only once a config is valid
    from causalimg.pipeline.graph import run_pipeline
    from causalimg.training.accelerator import finish, make_accelerator

    accelerator = make_accelerator(TrainConfig(), run_dir)
    ok = False
    try:
        results = run_pipeline(config, registry, accelerator, only=args.only, start=args.start)
        ok = True
    finally:
        finish(accelerator, ok=ok)
    if is_main_process() and "report" in results:
        print("\n".join(results["report"]["summary"].get("findings", [])))
        print(f"report: {results['report']['summary'].get('report')}")
    return 0


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's pre-emption, ``kill``, ``timeout``) ends the run like Ctrl-C: the
    current stage stops where it is, every rank's exit path runs, and ``--resume`` continues from
    the last checkpoint; the default action would end the process with no message."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt_on_sigterm()
    return report_errors(lambda: run(args), prog="causalimg.run")


if __name__ == "__main__":
    sys.exit(main())
