"""``causalimg augment``: counterfactuals of a whole split written as a ``folder`` data set, for training.

Every image of the split gets every intervention of the spec. Output, readable by ``data: {name:
folder, path: DIR}`` with the run's partitioner::

  DIR/dataset.json                      label map and structures from the model's schema (same variable names)
  DIR/<split>/<index>-<j>.npz           image x~ in [-1, 1]; mask: the evaluation segmentor's class
                                        probabilities of x~ (channel = class); metadata: the source
                                        image's (e.g. boundaries_mm), spacing_mm, provenance (JSON)
  DIR/provenance-<split>.csv            one row per image written or skipped: source, intervention, targets
  DIR/augment.json                      the settings and, per split, whether it is complete

Streaming and resumable: the split is cut into chunks of ``batch_size`` source images (chunk c
runs on rank c mod the number of processes); a chunk's images are written first and its record
``DIR/.augment/<split>/<c>.json`` last, so a rerun with the same settings skips finished chunks and
redoes an interrupted one bit for bit (targets are drawn per image and intervention, abduction is
seeded per chunk). The same command under ``accelerate launch`` spreads the chunks over processes.

Spec (``--interventions``, repeatable): an inline intervention ``cpa_mid=+20`` or
``cpa_mid=+20,la_mid=U(60, 90)``, or a YAML file holding a list of them, each a mapping
``{cpa_mid: "+20"}`` or such a string (values: ``api.interventions``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import causalimg
from causalimg.api.interventions import (
    Intervention,
    OutOfSupport,
    describe,
    parse_assignments,
    parse_intervention,
    resolve,
)
from causalimg.api.model import CounterfactualModel
from causalimg.core.data import SPLITS, split_size
from causalimg.data.folder_writer import write_dataset_json, write_item
from causalimg.errors import ConfigError, InterventionError
from causalimg.io import atomic_write_json, atomic_write_text, read_json

SETTINGS_FILE = "augment.json"
CHUNKS = ".augment"  # per split, one record per finished chunk


def read_spec(specs: Sequence[str], names: Sequence[str]) -> list[Intervention]:
    """Interventions from inline texts and YAML files, in the order given."""
    import yaml

    out: list[Intervention] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if ("=" not in spec and path.suffix.lower() in (".yaml", ".yml", ".json")) or path.is_file():
            try:
                entries = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"--interventions {spec}: unreadable ({type(err).__name__}: {err})") from None
            if not isinstance(entries, list) or not entries:
                raise ConfigError(
                    f"--interventions {spec}: expected a YAML list of interventions, e.g. - {{cpa_mid: '+20'}}"
                )
            for k, entry in enumerate(entries):
                try:
                    if isinstance(entry, str):
                        out.append(parse_assignments([entry], names))
                    elif isinstance(entry, dict):
                        out.append(
                            parse_intervention(
                                {str(n): v if isinstance(v, (int, float)) else str(v) for n, v in entry.items()}, names
                            )
                        )
                    else:
                        raise InterventionError(f"{entry!r} is neither a mapping nor a text such as 'cpa_mid=+20'")
                except InterventionError as err:
                    raise InterventionError(f"--interventions {spec}, entry {k + 1}: {err}") from None
        else:
            out.append(parse_assignments([spec], names))
    if not out:
        raise ConfigError("--interventions: give at least one, e.g. --interventions cpa_mid=+20")
    return out


@dataclass(frozen=True)
class Settings:
    """What decides the output; a rerun into the same folder must match to resume."""

    model: str
    strategy: str
    weights_sha256: str
    split: str
    interventions: tuple[str, ...]
    seed: int
    policy: str
    batch_size: int
    temperature: float
    limit: int | None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "interventions": list(self.interventions)}


def _settings(
    model: CounterfactualModel,
    split: str,
    interventions: list[Intervention],
    seed: int,
    policy: str,
    batch_size: int,
    limit: int | None,
) -> Settings:
    from causalimg.api.bundle import sha256

    return Settings(
        str(model.files.root.resolve()),
        model.strategy,
        sha256(model.files["dscm"]),
        split,
        tuple(describe(i) for i in interventions),
        seed,
        policy,
        batch_size,
        model.temperature,
        limit,
    )


def _claim(out: Path, settings: Settings, is_main: bool) -> None:
    """Record the split's settings, or check that a rerun asks for the same ones."""
    saved = read_json(out / SETTINGS_FILE) or {}
    splits = saved.get("splits", {})
    previous = splits.get(settings.split, {}).get("settings")
    if previous is not None and previous != settings.as_dict():
        changed = sorted(k for k, v in settings.as_dict().items() if previous.get(k) != v)
        raise ConfigError(
            f"{out}: split {settings.split!r} was written with other settings ({', '.join(changed)} differ); "
            "rerun with the same ones to resume, or choose a new --out"
        )
    if is_main and previous is None:
        splits[settings.split] = {"settings": settings.as_dict(), "complete": False}
        atomic_write_json(out / SETTINGS_FILE, {"causalimg": causalimg.__version__, "splits": splits})


def augment(
    model: CounterfactualModel,
    split: str,
    interventions: list[Intervention],
    out: Path,
    *,
    accelerator: Any,
    policy: OutOfSupport = "error",
    seed: int = 0,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish writing) one split; returns the counts of this split. Every rank calls it."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose among {', '.join(SPLITS)}")
    data = model.data_source().split(split)
    n = split_size(data) if limit is None else min(limit, split_size(data))
    settings = _settings(model, split, interventions, seed, policy, batch_size, limit)
    if policy == "error":
        _check_support(model, data, n, interventions, seed, split)  # before anything is written
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    _claim(out, settings, accelerator.is_main_process)
    folder, records = out / split, out / CHUNKS / split
    folder.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    chunks = [c for c in range(rank, -(-n // batch_size), world) if not (records / f"{c}.json").is_file()]
    width = max(len(str(n - 1)), 5)
    with tqdm(
        total=len(chunks) * batch_size * len(interventions),
        desc=f"augment {split} (rank {rank})",
        unit="img",
        disable=not progress,
    ) as bar:
        for c in chunks:
            start, stop = c * batch_size, min((c + 1) * batch_size, n)
            rows = _chunk(model, data, range(start, stop), interventions, folder, width, settings)
            atomic_write_json(records / f"{c}.json", rows)
            bar.update((stop - start) * len(interventions))
    accelerator.wait_for_everyone()
    summary = _finish(model, out, split, n, batch_size, settings) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()
    return summary


def _check_support(
    model: CounterfactualModel, data: Any, n: int, interventions: list[Intervention], seed: int, split: str
) -> None:
    """Every target of every image inside its support, or one message before anything is written."""
    parents = torch.cat([b["parents"] for b in DataLoader(Subset(data, range(n)), batch_size=512)])
    keys = list(range(n))
    labels = [f"{split} image {i}" for i in keys]
    for j, intervention in enumerate(interventions):
        resolve(
            intervention,
            parents,
            model.transform,
            keys=keys,
            seed=seed,
            which=j,
            policy="error",
            labels=labels,
            hint="clamp such targets to the support with --out-of-support clamp, or leave them out with skip",
        )


def _chunk(
    model: CounterfactualModel,
    data: Any,
    indices: range,
    interventions: list[Intervention],
    folder: Path,
    width: int,
    settings: Settings,
) -> list[dict[str, Any]]:
    """Counterfactuals of one chunk under every intervention, written; returns their provenance rows."""
    items = [data[i] for i in indices]
    images = torch.stack([item["image"] for item in items])
    parents = torch.stack([item["parents"] for item in items])
    regions = torch.stack([item["regions"] for item in items])
    metadata = [_metadata(data, i) for i in indices]
    sources = [str(m.pop("source", "")) for m in metadata]
    factual = model.factual(
        images,
        parents=parents,
        regions=regions,
        seed=settings.seed * 1_000_003 + indices.start,
        batch_size=len(indices),
    )
    rows = []
    for j, intervention in enumerate(interventions):
        targets = resolve(
            intervention,
            factual.parents,
            model.transform,
            keys=list(indices),
            seed=settings.seed,
            which=j,
            policy=cast(OutOfSupport, settings.policy),
        )
        result = model.counterfactual(factual, targets.values)
        probs = result.masks.numpy()  # (B, C, H, W) float32, the evaluation segmentor's on x~
        for b, index in enumerate(indices):
            asked = {name: float(v[b]) for name, v in targets.values.items()}
            row = {
                "file": f"{index:0{width}d}-{j:02d}.npz",
                "source_split": settings.split,
                "source_index": index,
                "source_file": sources[b],
                "intervention": describe(intervention),
                "targets": asked,
                "requested": {name: float(v[b]) for name, v in targets.requested.items()},
                "clamped": [name for name, v in targets.clamped.items() if bool(v[b])],
                "factual": {name: float(p) for name, p in zip(model.names, factual.parents[b])},
                "written": bool(targets.keep[b]),
            }
            if row["written"]:
                provenance = {
                    **row,
                    "model": settings.model,
                    "strategy": settings.strategy,
                    "temperature": settings.temperature,
                    "seed": settings.seed,
                    "causalimg": causalimg.__version__,
                }
                meta = {**metadata[b], "spacing_mm": model.spacing_mm, "provenance": json.dumps(provenance)}
                write_item(folder / str(row["file"]), result.images[b, 0].numpy(), probs[b], meta)
            rows.append(row)
    return rows


def _metadata(data: Any, index: int) -> dict[str, Any]:
    """The source image's own metadata (a folder data set's arrays, e.g. ``boundaries_mm``), if it has any."""
    if not hasattr(data, "metadata"):
        return {}
    return {k: v for k, v in dict(data.metadata(index)).items() if isinstance(v, (int, float, str, list))}


def _finish(
    model: CounterfactualModel, out: Path, split: str, n: int, batch_size: int, settings: Settings
) -> dict[str, Any]:
    """dataset.json, the split's provenance table and its completion, once every chunk is recorded."""
    rows: list[dict[str, Any]] = []
    for c in range(-(-n // batch_size)):
        rows.extend(read_json(out / CHUNKS / split / f"{c}.json") or [])
    write_dataset_json(out, model.schema, model.spacing_mm)
    atomic_write_text(out / f"provenance-{split}.csv", _provenance_csv(rows))
    written = sum(r["written"] for r in rows)
    saved = read_json(out / SETTINGS_FILE) or {"splits": {}}
    saved["splits"][split] = {
        "settings": settings.as_dict(),
        "complete": True,
        "written": written,
        "skipped": len(rows) - written,
    }
    atomic_write_json(out / SETTINGS_FILE, saved)
    return saved["splits"][split]


def _provenance_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = [
        "file",
        "written",
        "source_split",
        "source_index",
        "source_file",
        "intervention",
        "targets",
        "requested",
        "clamped",
        "factual",
    ]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return buffer.getvalue()


def augment_command(
    run: str,
    strategy: str | None,
    splits: str,
    specs: Sequence[str],
    out: str,
    *,
    policy: str,
    seed: int,
    batch_size: int,
    limit: int | None,
    device: str | None,
    check_versions: bool,
) -> int:
    from causalimg.config.sections import TrainConfig
    from causalimg.training.accelerator import finish, make_accelerator

    wanted = [s.strip() for s in splits.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown or not wanted:
        raise ConfigError(f"--split {splits}: choose among {', '.join(SPLITS)} (comma-separated)")
    accelerator = make_accelerator(TrainConfig(), Path(out))
    ok = False
    try:
        model = CounterfactualModel.from_pretrained(
            run, strategy, device or accelerator.device, check_versions=check_versions
        )
        interventions = read_spec(specs, model.names)
        for split in wanted:
            summary = augment(
                model,
                split,
                interventions,
                Path(out),
                accelerator=accelerator,
                policy=policy,  # type: ignore[arg-type]
                seed=seed,
                batch_size=batch_size,
                limit=limit,
                progress=accelerator.is_main_process,
            )
            if accelerator.is_main_process:
                print(
                    f"{split}: {summary['written']} counterfactuals written, {summary['skipped']} skipped -> {Path(out) / split}"
                )
        ok = True
    finally:
        finish(accelerator, ok=ok)
    return 0
