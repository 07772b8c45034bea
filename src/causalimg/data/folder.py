"""The ``folder`` data set: users' own images with label masks, parents measured from the masks.

Layout: ``<path>/<split>/`` for split in train, val, test, each holding either

* ``<stem>.npz`` with ``image`` (H, W) and ``mask`` (H, W) integer labels or (L, H, W) soft
  fractions (channel i = label value i); every other array in the file is per-image metadata
  (for example ``boundaries_mm`` for the ``landmarks`` partitioner); or
* ``<stem>.png`` image with ``<stem>_mask.png`` integer labels, and optionally ``<stem>.json``
  metadata;

and optionally ``<path>/dataset.json``, the folder's own description (``label_map``,
``structures``, ``spacing_mm``, ``window``), which the config's fields override one by one.

The folder's anatomy comes from its labels: ``label_map`` names the class of every label value
(any number of classes, any names; several values may share a class), and every class except the
one of label 0 is a structure whose area in each region is a variable, named after the class
unless ``structures`` says otherwise. Images are either already in [-1, 1] (``window: null``) or in
HU, mapped to [-1, 1] by ``window``; 8/16-bit PNGs are scaled by their bit depth. The parents are
the regional areas measured with the configured partitioner and the schema's measurement, the
same one the rest of causalimg uses. Every unusable file is a DataError naming the file, or, with
``on_bad_file: skip``, is listed in ``<root>/folder_skipped.txt`` and warned about.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, PositiveFloat, ValidationError, field_validator
from torch.utils.data import Dataset

import causalimg
from causalimg.core.data import SPLITS, Split
from causalimg.core.regions import Partitioner
from causalimg.core.schema import Structure, VariableSchema
from causalimg.errors import ConfigError, DataError
from causalimg.plugins.specs import DatasetSpec
from causalimg.strict import StrictModel

MANIFEST = "dataset.json"  # a folder's own description; config fields override it


class StructureConfig(StrictModel):
    """A class whose area in each region is a causal variable."""

    variable: str | None = Field(None, pattern=r"^[a-z][a-z0-9]*$")  # variable prefix; None: the class name
    title: str = ""  # e.g. "calcified plaque area"
    abbreviation: str = ""  # how tables name it, e.g. "CPA"


class FolderConfig(StrictModel):
    """Where the files are, what their labels are, and their pixel spacing (None: from dataset.json)."""

    name: Literal["folder"] = "folder"
    path: Path
    spacing_mm: PositiveFloat | None = None
    label_map: dict[int, str] | None = Field(None, min_length=1)  # file label value -> class name
    # class -> its variables; None: every class but label 0's
    structures: dict[str, StructureConfig] | None = Field(None, min_length=1)
    window: tuple[float, float] | None = None  # HU window mapped to [-1, 1]; None: images already in [-1, 1]
    on_bad_file: Literal["error", "skip"] = "error"

    @field_validator("label_map")
    @classmethod
    def _labels(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        if v is not None and any(k < 0 for k in v):
            raise ValueError(f"label values must be >= 0, got {sorted(v)}")
        if v is not None and not all(isinstance(n, str) and n for n in v.values()):
            raise ValueError("class names must be non-empty strings")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[1] <= v[0]:
            raise ValueError(f"window must be (low, high) with low < high, got {v}")
        return v


def resolved_config(config: FolderConfig) -> FolderConfig:
    """The config with every field left unset filled from ``<path>/dataset.json`` (when present)."""
    manifest = config.path / MANIFEST
    if not manifest.is_file():
        described: dict[str, Any] = {}
    else:
        try:
            described = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{manifest}: not a readable JSON object ({err})") from None
        if not isinstance(described, dict):
            raise DataError(f"{manifest}: must hold a JSON object, not a {type(described).__name__}")
    known = {"label_map", "structures", "spacing_mm", "window"}
    unknown = sorted(set(described) - known)
    if unknown:
        raise DataError(f"{manifest}: unknown fields {unknown}; it may give {sorted(known)}")
    given = config.model_dump(exclude_unset=True)
    merged = {**described, **given, "name": "folder", "path": config.path}
    try:
        config = FolderConfig.model_validate(merged)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{manifest}: {where}: {first['msg']}") from None
    for field in ("label_map", "spacing_mm"):
        if getattr(config, field) is None:
            raise ConfigError(f"data.{field} is required: give it in the config or in {manifest}")
    return config


def folder_schema(config: FolderConfig, regions: tuple[str, ...]) -> VariableSchema:
    """Classes from the label map (ordered by their smallest label value), structures from ``structures``."""
    assert config.label_map is not None
    classes = tuple(dict.fromkeys(config.label_map[v] for v in sorted(config.label_map)))
    if config.structures is None:
        background = config.label_map.get(0)
        chosen = {c: StructureConfig() for c in classes if c != background}
    else:
        chosen = dict(config.structures)
        unknown = [c for c in chosen if c not in classes]
        if unknown:
            raise ConfigError(f"data.structures names {unknown}, which are not classes of label_map {list(classes)}")
    structures = tuple(
        Structure(s.variable or c, classes.index(c), s.title or f"{c} area", s.abbreviation) for c, s in chosen.items()
    )
    for s in structures:
        if not s.name.isidentifier():
            raise ConfigError(f"class {s.name!r} cannot name variables; give data.structures.{s.name}.variable")
    return VariableSchema(classes, structures, regions)


class _BadFile(Exception):
    """A file's problem; becomes a DataError or a skip-report line."""


class FolderSource:
    """A :class:`~causalimg.core.data.DataSource` over a directory of image/mask files."""

    def __init__(self, config: FolderConfig, partitioner: Partitioner, root: Path):
        if not config.path.is_dir():
            raise DataError(f"data.path {str(config.path)!r} is not a directory")
        self.config = config = resolved_config(config)
        self.partitioner = partitioner
        self.schema = folder_schema(config, tuple(partitioner.region_names))
        assert config.spacing_mm is not None and config.label_map is not None
        self.spacing_mm: float = config.spacing_mm
        self.label_map: dict[int, str] = config.label_map
        self.root = Path(root)
        self._lut = self._label_lookup()
        self.skipped: list[tuple[Path, str]] = []
        self._files: dict[str, list[Path]] = {}
        self._parents: dict[str, torch.Tensor] = {}
        self.image_shape: tuple[int, int] | None = None
        for split in SPLITS:
            if (config.path / split).is_dir():
                self._scan(split)
        if not self._files:
            raise DataError(f"data.path {str(config.path)!r} has none of the split folders {', '.join(SPLITS)}")
        if self.skipped:
            self._report_skipped()

    @classmethod
    def from_config(cls, config: FolderConfig, *, partitioner: Partitioner, root: Path) -> FolderSource:
        return cls(config, partitioner, root)

    def _label_lookup(self) -> np.ndarray:
        """(max label + 1,) class index of each file label value; -1 where the map has no entry."""
        lut = np.full(max(self.label_map) + 1, -1, dtype=np.int64)
        for value, cls_name in self.label_map.items():
            lut[value] = self.schema.classes.index(cls_name)
        return lut

    # -- reading one file ----------------------------------------------------------------------
    def _images(self, folder: Path) -> list[Path]:
        npz = sorted(folder.glob("*.npz"))
        png = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_mask"))
        return npz + png

    def load(self, path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Image (1, H, W) in [-1, 1], masks (C, H, W) class fractions and metadata of one file."""
        try:
            image, mask, meta = self._read(path)
            self._check_spacing(meta.get("spacing_mm"))
            return (*self._convert(image, mask), meta)
        except _BadFile as err:
            raise DataError(f"{path}: {err}") from None

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except Exception as err:  # a foreign file may fail in any parser layer: it is the file's fault
                raise _BadFile(f"cannot be read as .npz ({type(err).__name__}: {err})") from None
            for key in ("image", "mask"):
                if key not in arrays:
                    raise _BadFile(f"has no {key!r} array (has {sorted(arrays)})")
            meta = {k: v.tolist() for k, v in arrays.items() if k not in ("image", "mask")}
            return arrays["image"], arrays["mask"], {**meta, "source": str(path)}
        mask_path = path.with_name(f"{path.stem}_mask.png")
        if not mask_path.exists():
            raise _BadFile(f"has no mask file {mask_path.name}")
        try:
            with Image.open(path) as im:
                image = np.asarray(im)
                bits = 16 if im.mode.startswith("I") else 8
            with Image.open(mask_path) as im:
                mask = np.asarray(im)
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... for broken files
            raise _BadFile(f"cannot be read as PNG ({type(err).__name__}: {err})") from None
        if image.ndim == 2:
            image = image.astype(np.float64) / (2**bits - 1) * 2.0 - 1.0
        meta_path = path.with_suffix(".json")
        described: dict[str, Any] = {}
        if meta_path.exists():
            try:
                described = json.loads(meta_path.read_text())
            except json.JSONDecodeError as err:
                raise _BadFile(f"metadata {meta_path.name} is not valid JSON ({err})") from None
            if not isinstance(described, dict):
                raise _BadFile(f"metadata {meta_path.name} must hold a JSON object, not a {type(described).__name__}")
        return image, mask, {**described, "source": str(path)}

    def _check_spacing(self, spacing: Any) -> None:
        """A file that states its own pixel spacing must agree with ``data.spacing_mm``."""
        if spacing is None:
            return
        try:
            values = np.asarray(spacing, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise _BadFile(f"metadata spacing_mm {spacing!r} is not a number") from None
        if values.size == 0 or not np.allclose(values, self.spacing_mm, rtol=1e-6, atol=0.0):
            shown = ", ".join(f"{v:g}" for v in values)
            raise _BadFile(f"spacing_mm {shown} differs from data.spacing_mm {self.spacing_mm:g}")

    def _convert(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 2:
            raise _BadFile(f"image must be 2-D (H, W), got shape {image.shape}")
        if image.dtype.kind not in "iuf":
            raise _BadFile(f"image has dtype {image.dtype}; expected integers or floats")
        if image.size == 0:
            raise _BadFile(f"image is empty (shape {image.shape})")
        image = image.astype(np.float64)
        if not np.isfinite(image).all():
            raise _BadFile(f"image has {int((~np.isfinite(image)).sum())} NaN or Inf pixels")
        if self.config.window is not None:
            lo, hi = self.config.window
            image = np.clip((image - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)
        elif image.min() < -1.0 - 1e-6 or image.max() > 1.0 + 1e-6:
            raise _BadFile(
                f"image values span [{image.min():g}, {image.max():g}] outside [-1, 1]; set data.window to "
                f"the HU window that maps them"
            )
        masks = self._class_fractions(mask, image.shape)
        return torch.from_numpy(image.astype(np.float32))[None], masks

    def _class_fractions(self, mask: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        if mask.dtype.kind not in "iufb":
            raise _BadFile(f"mask has dtype {mask.dtype}; expected integer labels or float fractions")
        if mask.ndim == 2:  # integer labels
            if mask.shape != shape:
                raise _BadFile(f"mask shape {mask.shape} differs from image shape {shape}")
            if not np.issubdtype(mask.dtype, np.integer):
                if not (np.isfinite(mask).all() and np.all(mask == np.round(mask))):
                    raise _BadFile(f"label mask has non-integer values (dtype {mask.dtype})")
                mask = mask.astype(np.int64)
            values = np.unique(mask)
            bad = [int(v) for v in values if v < 0 or v >= len(self._lut) or self._lut[v] < 0]
            if bad:
                raise _BadFile(f"mask labels {bad} are not in label_map {sorted(self.label_map)}")
            labels = torch.from_numpy(self._lut[mask])
            return torch.nn.functional.one_hot(labels, self.schema.num_classes).permute(2, 0, 1).to(torch.float32)
        if mask.ndim == 3:  # soft fractions, channel = label value
            if mask.shape[1:] != shape:
                raise _BadFile(f"soft mask shape {mask.shape} does not match image shape {shape}")
            if mask.shape[0] != len(self._lut) or (self._lut < 0).any():
                raise _BadFile(
                    f"soft mask has {mask.shape[0]} channels; label_map needs one per label 0..{len(self._lut) - 1}"
                )
            mask = mask.astype(np.float64)
            if not np.isfinite(mask).all() or mask.min() < 0 or np.abs(mask.sum(0) - 1).max() > 1e-3:
                raise _BadFile("soft mask must be finite, >= 0 and sum to 1 over channels at every pixel")
            out = np.zeros((self.schema.num_classes, *shape), np.float64)
            np.add.at(out, self._lut, mask)
            return torch.from_numpy(out.astype(np.float32))
        raise _BadFile(f"mask must be (H, W) labels or (L, H, W) fractions, got shape {mask.shape}")

    # -- scanning ------------------------------------------------------------------------------
    def _scan(self, split: str) -> None:
        files, parents = [], []
        folder = self.config.path / split
        for path in self._images(folder):
            try:
                image, masks, meta = self.load(path)
                shape = tuple(image.shape[1:])
                if self.image_shape is not None and shape != self.image_shape:
                    raise DataError(f"{path}: image shape {shape} differs from the data set's {self.image_shape}")
                regions = self.partitioner.masks(shape[0], shape[1], self.spacing_mm, meta)  # (K, H, W)
                pa = self.schema.measure(masks[None], regions[None], self.spacing_mm**2)[0]
            except DataError as err:
                if self.config.on_bad_file == "error":
                    raise
                self.skipped.append((path, str(err)))
                continue
            self.image_shape = self.image_shape or shape  # type: ignore[assignment]
            files.append(path)
            parents.append(pa)
        if not files:
            raise DataError(
                f"{folder}: no usable .npz or .png/_mask.png files"
                + (f" ({len(self.skipped)} skipped, see {self.root / 'folder_skipped.txt'})" if self.skipped else "")
            )
        self._files[split] = files
        self._parents[split] = torch.stack(parents)

    def _report_skipped(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        report = self.root / "folder_skipped.txt"
        report.write_text("".join(f"{path}\t{why}\n" for path, why in self.skipped))
        warnings.warn(f"data.folder skipped {len(self.skipped)} unusable files; see {report}", stacklevel=2)

    # -- data-source API -----------------------------------------------------------------------
    def split(self, name: Split) -> Dataset:
        if name not in self._files:
            raise ConfigError(f"split {name!r} has no folder {self.config.path / name}")
        return FolderDataset(self, name)


class FolderDataset(Dataset):
    """One split of a folder data set; files are re-read per item, parents were measured at scan time."""

    def __init__(self, source: FolderSource, split: str):
        self.source, self.split_name = source, split
        self.files = source._files[split]
        self.parents = source._parents[split]

    def __len__(self) -> int:
        return len(self.files)

    def metadata(self, index: int) -> Mapping[str, Any]:
        return self.source.load(self.files[index])[2]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, masks, meta = self.source.load(self.files[index])
        h, w = image.shape[1:]
        return {
            "image": image,
            "masks": masks,
            "labels": masks.argmax(0),
            "parents": self.parents[index],
            "regions": self.source.partitioner.masks(h, w, self.source.spacing_mm, meta),
            "index": torch.tensor(index, dtype=torch.int64),
        }


@causalimg.hookimpl
def causalimg_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(
            name="folder",
            config=FolderConfig,
            factory=FolderSource.from_config,
            summary="Your own .npz or PNG images with label masks; parents measured from the masks",
        )
    ]
