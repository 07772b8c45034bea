"""The stage mechanism: named steps with config hashes, atomic outputs and completion recorded last.

A stage owns ``run_dir/<name>/``. Its hash is the sha256 of the canonical JSON of exactly the
config it reads plus the hashes of the stages it depends on, so changing one fine-tuning strategy
changes that strategy's hash and everything downstream of it, and nothing else.

Life of a stage directory:
  1. ``started.json`` (hash) is written before the stage body runs. If a directory holds a
     ``started.json`` of ANOTHER hash, its contents belong to another config and are deleted; with
     the same hash they are kept, so a training stage can resume from its own checkpoints.
  2. The body writes its outputs with the ``causalimg.io`` atomic helpers (temp file + rename); a
     failure with the disk nearly full is one ``DiskFullError`` naming the free space.
  3. Its training checkpoints are removed (they serve an unfinished stage only), then
     ``done.json`` (hash, timings, summary, size and digest of every file left) is written last,
     atomically. Only a ``done.json`` that parses and carries the current hash marks a stage
     complete; anything else is redone. A complete stage whose files changed since is refused by
     name (``pipeline.outputs``).

Selection: ``only=S`` redoes S alone; ``start=S`` redoes S and every later stage; S may be a
group (``finetune`` for every ``finetune/<label>``). The stages they depend on must already be
complete with unchanged hashes. Without selection a stage is skipped when complete and redone
otherwise; a stage built on upstream outputs that were redone since is stale (see ``is_complete``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from causalimg.errors import ConfigError, DataError, DiskFullError
from causalimg.io import atomic_write_json, disk_full, free_bytes, is_disk_full, read_json
from causalimg.pipeline import outputs

DONE = "done.json"
STARTED = "started.json"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"  # the training loop's folder of a stage
LOW_SPACE = 64 * 2**20  # a stage that fails with less free space than this failed for lack of it


class ProcessGroup(Protocol):
    """The part of ``accelerate.Accelerator`` stages need: who writes, and a barrier."""

    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


class SingleProcess:
    """A one-process group, for runs and tests without Accelerate."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        return None


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give equal text on any machine."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(config: Any, upstream: Mapping[str, str]) -> str:
    """sha256 of the stage's config and its upstream stages' hashes."""
    payload = canonical_json({"config": config, "upstream": dict(upstream)})
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class StageContext:
    """What a stage body gets: its directory, its upstream stages' directories and the process group."""

    name: str
    dir: Path
    hash: str
    inputs: Mapping[str, Path]  # upstream stage name -> its directory
    group: ProcessGroup


@dataclass(frozen=True)
class Stage:
    """One pipeline step.

    config:   the exact JSON-able config this stage reads (nothing more, so unrelated edits keep it)
    run:      the body; returns a JSON-able summary recorded in ``done.json``. Every process calls
              it (training stages need all ranks); the body itself decides who writes files.
    upstream: names of the stages whose outputs it reads.
    """

    name: str  # also its directory under the run directory; ``group/label`` for per-strategy stages
    run: Callable[[StageContext], Mapping[str, Any]]
    config: Any = None
    upstream: tuple[str, ...] = ()


@dataclass
class StageResult:
    name: str
    hash: str
    status: str  # "ran" or "skipped"
    seconds: float
    summary: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"hash": self.hash, "status": self.status, "seconds": self.seconds, "summary": dict(self.summary)}


def stage_hashes(stages: Sequence[Stage]) -> dict[str, str]:
    """Hash of every stage, in order; an unknown or later upstream name is an error."""
    hashes: dict[str, str] = {}
    for stage in stages:
        missing = [u for u in stage.upstream if u not in hashes]
        if missing:
            raise ConfigError(f"stage {stage.name!r} depends on {missing}, which do not come before it")
        if stage.name in hashes:
            raise ConfigError(f"two stages are named {stage.name!r}")
        hashes[stage.name] = config_hash(
            {"stage": stage.name, "config": stage.config}, {u: hashes[u] for u in stage.upstream}
        )
    return hashes


def completion(stage_dir: Path) -> dict[str, Any] | None:
    """The parsed ``done.json`` of a stage directory, or None."""
    done = read_json(stage_dir / DONE)
    return done if isinstance(done, dict) and "hash" in done and "finished" in done else None


def is_complete(stage_dir: Path, expected_hash: str, upstream_finished: Mapping[str, float] | None = None) -> bool:
    """Done with this hash, and built on the very upstream outputs that exist now.

    ``upstream_finished`` maps each upstream stage to the ``finished`` stamp of its current
    ``done.json``: a stage whose upstream was redone since (``--only``) is stale even though its
    config hash is unchanged.
    """
    done = completion(stage_dir)
    if done is None or done["hash"] != expected_hash:
        return False
    return upstream_finished is None or done.get("upstream_finished") == dict(upstream_finished)


def group_of(name: str) -> str:
    """``finetune/pos-seg`` -> ``finetune``: stages run once per strategy share a group name."""
    return name.split("/", 1)[0]


def select(stages: Sequence[Stage], only: str | None, start: str | None) -> set[str]:
    """Names of the stages to redo unconditionally (``only``/``start``); others run only if stale.

    ``only``/``start`` name a stage (``finetune/pos-seg``) or a group (``finetune``: all of them).
    """
    if only is not None and start is not None:
        raise ConfigError("--only and --from cannot be combined")
    names = [s.name for s in stages]
    chosen = only if only is not None else start
    if chosen is None:
        return set()
    matches = [i for i, name in enumerate(names) if chosen in (name, group_of(name))]
    if not matches:
        flag = "--only" if only is not None else "--from"
        groups = list(dict.fromkeys(group_of(n) for n in names))
        raise ConfigError(
            f"{flag} {chosen!r} is not a stage; stages: {', '.join(groups)} (or one of {', '.join(names)})"
        )
    if only is not None:
        return {names[i] for i in matches}
    return set(names[matches[0] :])


def _prepare(stage_dir: Path, stage_hash: str, group: ProcessGroup) -> None:
    """Make the directory this hash's own: forget completion, drop another config's leftovers."""
    if group.is_main_process:
        (stage_dir / DONE).unlink(missing_ok=True)
        started = read_json(stage_dir / STARTED)
        if stage_dir.exists() and not (isinstance(started, dict) and started.get("hash") == stage_hash):
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stage_dir / STARTED, {"hash": stage_hash, "started": time.time()})
    group.wait_for_everyone()


def run_stages(
    stages: Sequence[Stage],
    run_dir: Path,
    group: ProcessGroup | None = None,
    only: str | None = None,
    start: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, StageResult]:
    """Run, skip or redo each stage in order; returns name -> result for the stages considered."""
    group = group or SingleProcess()
    run_dir = Path(run_dir)
    hashes = stage_hashes(stages)
    forced = select(stages, only, start)
    needed = set().union(*(_ancestors(stages, name) for name in forced)) - forced
    finished: dict[str, float] = {}  # stage -> "finished" stamp of its current done.json
    results: dict[str, StageResult] = {}
    for stage in stages:
        stage_dir = run_dir / stage.name
        stage_hash = hashes[stage.name]
        if any(u not in finished for u in stage.upstream):
            continue  # an upstream stage was neither run nor required (outside --only)
        upstream_finished = {u: finished[u] for u in stage.upstream}
        complete = is_complete(stage_dir, stage_hash, upstream_finished)
        if stage.name not in forced and (complete or forced):
            if not complete and stage.name in needed:
                raise ConfigError(
                    f"stage {stage.name!r} is not complete for this config (in {stage_dir}); "
                    "run the pipeline without --only/--from first"
                )
            if complete:
                done = completion(stage_dir)
                assert done is not None  # complete means a done.json of this hash
                problems = outputs.changed(stage_dir, done.get("files", {}))
                if problems:
                    raise DataError(
                        f"stage {stage.name!r} finished, but since then {'; '.join(problems[:3])}: restore the "
                        f"file, or delete the folder {stage_dir} to redo the stage and what depends on it"
                    )
                finished[stage.name] = done["finished"]
                if not forced or stage.name in needed:
                    log(f"[{stage.name}] up to date ({stage_hash[:12]}), skipped")
                    results[stage.name] = StageResult(stage.name, stage_hash, "skipped", 0.0, done.get("summary", {}))
            continue
        log(f"[{stage.name}] running ({stage_hash[:12]})")
        _prepare(stage_dir, stage_hash, group)
        if group.is_main_process:
            atomic_write_json(
                stage_dir / CONFIG, {"stage": stage.name, "config": stage.config, "upstream": list(stage.upstream)}
            )
        context = StageContext(stage.name, stage_dir, stage_hash, {u: run_dir / u for u in stage.upstream}, group)
        began = time.perf_counter()
        try:
            summary = dict(stage.run(context) or {})
        except Exception as err:  # a full disk surfaces as many libraries' errors: name it once
            if not isinstance(err, DiskFullError) and (is_disk_full(err) or free_bytes(stage_dir) < LOW_SPACE):
                raise disk_full(stage_dir, err) from err
            raise
        seconds = time.perf_counter() - began
        group.wait_for_everyone()
        if group.is_main_process:  # checkpoints serve an unfinished stage only: a finished one keeps its outputs
            shutil.rmtree(stage_dir / CHECKPOINTS, ignore_errors=True)
        stamp = time.time()
        if group.is_main_process:
            done = {
                "hash": stage_hash,
                "seconds": seconds,
                "finished": stamp,
                "upstream_finished": upstream_finished,
                "summary": summary,
                "files": outputs.record(stage_dir, {DONE, STARTED}),
            }
            atomic_write_json(stage_dir / DONE, done)
        group.wait_for_everyone()
        recorded = completion(stage_dir)
        if recorded is None:
            raise DataError(f"stage {stage.name!r}: {stage_dir / DONE} could not be read back after it was written")
        finished[stage.name] = recorded["finished"]
        log(f"[{stage.name}] done in {seconds:.1f} s")
        results[stage.name] = StageResult(stage.name, stage_hash, "ran", seconds, summary)
    return results


def _ancestors(stages: Sequence[Stage], name: str) -> set[str]:
    by_name = {s.name: s for s in stages}
    found: set[str] = set()
    pending = list(by_name[name].upstream)
    while pending:
        upstream = pending.pop()
        if upstream not in found:
            found.add(upstream)
            pending.extend(by_name[upstream].upstream)
    return found
