"""Where a trained model's files are: a run folder, or an exported model folder, and how to export one.

A run folder (``run.dir`` of ``python -m causalimg.run``) holds the model spread over its stages:
``config.yaml``, ``data/schema.json`` and ``data/transform.json``, ``finetune/<label>/weights.safetensors``
(the whole fine-tuned DSCM) and the two segmentors under ``predictors/``. An exported model folder
holds the same files flat, with ``model.json`` listing them with their sha256 and the versions that
wrote them, so it loads without the pipeline, the other strategies or the training data:

    model.json  config.yaml  schema.json  transform.json
    dscm.safetensors  evaluation-segmentor.safetensors  guidance-segmentor.safetensors
    (regressor.safetensors: a sampling-time strategy's, whose guidance predictors act at prediction)

``model.json`` is written last: a folder without it is not a (complete) exported model.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import causalimg
from causalimg.builder import SCHEMA_FILE, TRANSFORM_FILE, WEIGHTS_FILE
from causalimg.errors import ConfigError, DataError
from causalimg.io import atomic_path, atomic_write_json, read_json
from causalimg.pipeline.stage import DONE

MODEL_FILE = "model.json"
CONFIG_FILE = "config.yaml"  # the resolved run config (``causalimg.run.RESOLVED_CONFIG``)
FORMAT = 1  # of model.json; a reader refuses a newer one
DEFAULT_STRATEGY = "positional-segmentor"
SEGMENTORS = ("evaluation-segmentor", "guidance-segmentor")
EXPORTED = {  # role -> file name in an exported folder
    "config": CONFIG_FILE,
    "schema": SCHEMA_FILE,
    "transform": TRANSFORM_FILE,
    "dscm": "dscm.safetensors",
    "evaluation-segmentor": "evaluation-segmentor.safetensors",
    "guidance-segmentor": "guidance-segmentor.safetensors",
    "regressor": "regressor.safetensors",  # only with a sampling-time strategy, whose terms may read it
}
OPTIONAL = frozenset({"regressor"})


class ModelVersionError(DataError):
    """An exported model was written by a causalimg or torch whose weights this one may read differently."""


@dataclass(frozen=True)
class ModelFiles:
    """The files of one trained model and what its data stage recorded about the images.

    kind: ``run`` or ``exported``; files: role (``EXPORTED``'s keys) -> path.
    """

    root: Path
    kind: str
    strategy: str
    files: dict[str, Path]
    image_shape: tuple[int, int]
    spacing_mm: float
    inputs: dict[str, Any] | None = None  # an exported model's InputConvention; a run's comes from its config

    def __getitem__(self, role: str) -> Path:
        return self.files[role]


def locate(path: str | Path, strategy: str | None = None, *, check_versions: bool = True) -> ModelFiles:
    """The model files under ``path``: an exported model folder (``model.json``) or a run folder.

    ``strategy`` None: the exported folder's strategy; in a run folder ``positional-segmentor``, or the
    only strategy fine-tuned when there is one."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a run folder (run.dir) or an exported model folder")
    if (root / MODEL_FILE).exists():
        return _exported(root, strategy, check_versions)
    if (root / CONFIG_FILE).is_file():
        return _run(root, strategy)
    raise DataError(f"{root}: neither a run folder (no {CONFIG_FILE}) nor an exported model folder (no {MODEL_FILE})")


def _run(root: Path, strategy: str | None) -> ModelFiles:
    tuned = root / "finetune"  # finetune/<strategy>, or finetune/<mechanism>/<strategy> with several mechanisms
    finished = sorted(p.parent.relative_to(tuned).as_posix() for p in tuned.glob(f"**/{DONE}"))
    if strategy is None:
        if DEFAULT_STRATEGY in finished or len(finished) != 1:
            strategy = DEFAULT_STRATEGY
        else:
            strategy = finished[0]
    if strategy not in finished:
        raise ConfigError(
            f"{root}: strategy {strategy!r} has no finished fine-tuning (no finetune/{strategy}/{DONE}); "
            f"finished: {', '.join(finished) or 'none, finish the run with --resume'}"
        )
    files = {
        "config": root / CONFIG_FILE,
        "schema": root / "data" / SCHEMA_FILE,
        "transform": root / "data" / TRANSFORM_FILE,
        "dscm": root / "finetune" / strategy / WEIGHTS_FILE,
        **{name: root / "predictors" / name / WEIGHTS_FILE for name in SEGMENTORS},
    }
    if at_sampling_time(root / CONFIG_FILE, strategy):
        files["regressor"] = root / "predictors" / "regressor" / WEIGHTS_FILE
    for role in [r for r in files if r in (*SEGMENTORS, "regressor")]:
        if not (files[role].parent / DONE).is_file():
            raise DataError(f"{files[role].parent}: the {role} has not finished training; finish the run with --resume")
    _check_present(files)
    summary = (read_json(root / "data" / DONE) or {}).get("summary", {})
    try:
        shape = tuple(int(v) for v in summary["image_shape"])
        spacing = float(summary["spacing_mm"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{root / 'data' / DONE}: no image_shape and spacing_mm; rerun the data stage") from None
    return ModelFiles(root, "run", strategy, files, (shape[0], shape[1]), spacing)


def _exported(root: Path, strategy: str | None, check_versions: bool) -> ModelFiles:
    manifest = read_json(root / MODEL_FILE)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{root / MODEL_FILE}: not a readable model description")
    if int(manifest.get("format", 0)) > FORMAT:
        raise ModelVersionError(
            f"{root / MODEL_FILE}: format {manifest.get('format')} is newer than this causalimg reads ({FORMAT}); "
            f"it was written by causalimg {manifest.get('versions', {}).get('causalimg')}"
        )
    exported = manifest.get("strategy")
    if strategy is not None and strategy != exported:
        raise ConfigError(f"{root}: the exported model is strategy {exported!r}, not {strategy!r}")
    check_versions_of(manifest.get("versions", {}), root / MODEL_FILE, strict=check_versions)
    listed = manifest["files"]
    files = {role: root / name for role, name in EXPORTED.items() if role not in OPTIONAL or name in listed}
    _check_present(files)
    for path in files.values():
        expected = manifest["files"].get(path.name)
        if expected is None:
            raise DataError(f"{root / MODEL_FILE}: lists no {path.name}")
        if sha256(path) != expected:
            raise DataError(f"{path}: its sha256 differs from the one in {MODEL_FILE}; the file was changed or damaged")
    try:
        shape = (int(manifest["image_shape"][0]), int(manifest["image_shape"][1]))
        return ModelFiles(
            root, "exported", str(exported), files, shape, float(manifest["spacing_mm"]), manifest.get("inputs")
        )
    except (KeyError, TypeError, ValueError, IndexError):
        raise DataError(f"{root / MODEL_FILE}: no usable image_shape and spacing_mm") from None


def at_sampling_time(config_file: Path, label: str) -> bool:
    """Whether the model ``label`` (``<strategy>`` or ``<mechanism>/<strategy>``) is a sampling-time strategy."""
    from causalimg.config.loader import load_config

    return label.rsplit("/", 1)[-1] in load_config(config_file).finetune.sampling_time


def _check_present(files: dict[str, Path]) -> None:
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"missing model file{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")


def versions() -> dict[str, str]:
    """The versions whose code gives the saved weights their meaning."""
    import torch

    return {
        "causalimg": causalimg.__version__,
        "torch": torch.__version__.split("+")[0],
        "python": sys.version.split()[0],
    }


def check_versions_of(saved: dict[str, Any], where: Path, *, strict: bool = True) -> None:
    """causalimg must be the same release (its code defines the networks the weights fill) and torch the
    same major version; a different torch minor version only warns (the last bits of results may move).
    ``strict=False`` turns the errors into warnings."""
    ours = versions()
    problems = []
    if saved.get("causalimg") != ours["causalimg"]:
        problems.append(f"causalimg {saved.get('causalimg')} (this is {ours['causalimg']})")
    torch_saved = str(saved.get("torch", ""))
    if torch_saved.split(".")[:1] != ours["torch"].split(".")[:1]:
        problems.append(f"torch {torch_saved or 'unknown'} (this is {ours['torch']})")
    elif torch_saved.split(".")[:2] != ours["torch"].split(".")[:2]:
        warnings.warn(f"{where}: saved with torch {torch_saved}, loaded with {ours['torch']}", stacklevel=3)
    if problems:
        message = f"{where}: the model was exported with {' and '.join(problems)}"
        if strict:
            raise ModelVersionError(
                f"{message}; install that version, or load anyway with check_versions=False (--ignore-versions)"
            )
        warnings.warn(message, stacklevel=3)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(path: str | Path, strategy: str | None, out: str | Path) -> Path:
    """Copy one strategy's model into ``out`` (new or empty) with ``model.json``; returns ``out``."""
    from causalimg.api.images import input_convention
    from causalimg.config.loader import load_config

    files = locate(path, strategy)
    inputs = input_convention(load_config(files["config"]), files.inputs).to_json()
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for role, source in files.files.items():
        target = out / EXPORTED[role]
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        digests[target.name] = sha256(target)
    atomic_write_json(
        out / MODEL_FILE,
        {
            "format": FORMAT,
            "strategy": files.strategy,
            "image_shape": list(files.image_shape),
            "spacing_mm": files.spacing_mm,
            "inputs": inputs,
            "versions": versions(),
            "files": digests,
            "exported_from": str(files.root.resolve()),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return out
