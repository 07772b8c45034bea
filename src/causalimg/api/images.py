"""Users' image files in and out: the ``folder`` data set's formats, read as the model's training data was.

An input is a ``.npz`` (``image`` (H, W), optional ``mask`` (H, W) labels or (L, H, W) fractions,
every other array per-image metadata such as ``boundaries_mm``) or a PNG (8 or 16 bit grey, with an
optional ``<stem>_mask.png`` of labels and ``<stem>.json`` of metadata), or a folder of them.
Intensities map to [-1, 1] as the run's data did (``InputConvention``: the folder data set's HU
``window``, PNG bit depth), and label values to classes by its ``label_map``. Outputs are written in
the format and units of their input.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from causalimg.core.schema import VariableSchema
from causalimg.data.folder_writer import write_item
from causalimg.errors import CausalImgError, DataError
from causalimg.io import atomic_path, atomic_write_json

SUFFIXES = (".npz", ".png")


@dataclass(frozen=True)
class InputConvention:
    """How files map to what the model sees.

    window:    HU (low, high) mapped to [-1, 1]; None: float images are already in [-1, 1]
    label_map: label value -> class name; None: label value i is class i
    """

    window: tuple[float, float] | None = None
    label_map: dict[int, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "window": None if self.window is None else list(self.window),
            "label_map": None if self.label_map is None else {str(k): v for k, v in self.label_map.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> InputConvention:
        data = data or {}
        window = data.get("window")
        labels = data.get("label_map")
        return cls(
            None if window is None else (float(window[0]), float(window[1])),
            None if labels is None else {int(k): str(v) for k, v in labels.items()},
        )


def input_convention(config: Any, inputs: Mapping[str, Any] | None = None) -> InputConvention:
    """The run's input convention: recorded in an exported model (``inputs``), else from its data section.

    A ``folder`` data set gives its window and label map (from the config, or its dataset.json when
    that is still readable); generated data sets (the phantom) store [-1, 1] images and class indices.
    """
    if inputs is not None:
        return InputConvention.from_json(inputs)
    data = config.data
    if getattr(data, "name", None) != "folder":
        return InputConvention()
    from causalimg.data.folder import resolved_config

    with contextlib.suppress(CausalImgError):  # the data folder is gone: what the config itself says
        data = resolved_config(data)
    window = getattr(data, "window", None)
    return InputConvention(None if window is None else tuple(window), getattr(data, "label_map", None))


@dataclass
class ImageFile:
    """One input: image (H, W) in [-1, 1], masks (C, H, W) class fractions or None, its metadata."""

    path: Path
    image: torch.Tensor
    masks: torch.Tensor | None
    metadata: dict[str, Any] = field(default_factory=dict)
    bits: int = 0  # PNG bit depth; 0 for .npz

    @property
    def stem(self) -> str:
        return self.path.stem


def find_inputs(path: str | Path) -> list[Path]:
    """The image files of ``path``: the file itself, or the .npz and PNG files of a folder (masks left out)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES or path.stem.endswith("_mask"):
            raise DataError(f"--input {path}: not an image file (.npz, or .png that is not a _mask.png)")
        return [path]
    if not path.is_dir():
        raise DataError(f"--input {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and not p.stem.endswith("_mask"))
    if not files:
        raise DataError(f"--input {path}: the folder holds no .npz or .png images")
    return files


class Reader:
    """Reads input files for a model's schema and image shape under its input convention."""

    def __init__(self, schema: VariableSchema, image_shape: tuple[int, int], convention: InputConvention):
        self.schema, self.image_shape, self.convention = schema, tuple(image_shape), convention
        labels = convention.label_map or dict(enumerate(schema.classes))
        unknown = sorted({c for c in labels.values() if c not in schema.classes})
        if unknown:
            raise DataError(f"label_map names classes {unknown} that the model does not have ({list(schema.classes)})")
        self.lut = np.full(max(labels) + 1, -1, dtype=np.int64)  # label value -> class index
        for value, name in labels.items():
            self.lut[value] = schema.classes.index(name)
        self.label_of = {}  # class index -> the smallest label value of that class
        for value in sorted(labels, reverse=True):
            self.label_of[schema.classes.index(labels[value])] = value

    def read(self, path: Path) -> ImageFile:
        try:
            if path.suffix.lower() == ".npz":
                return self._npz(path)
            return self._png(path)
        except DataError as err:
            raise DataError(f"{path}: {err}") from None

    def _npz(self, path: Path) -> ImageFile:
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as err:  # any parser layer may fail on a foreign file
            raise DataError(f"cannot be read as .npz ({type(err).__name__}: {err})") from None
        if "image" not in arrays:
            raise DataError(f"has no 'image' array (has {sorted(arrays)})")
        meta = {k: v.tolist() for k, v in arrays.items() if k not in ("image", "mask")}
        image = self._intensities(arrays["image"], bits=0)
        masks = self._masks(arrays["mask"]) if "mask" in arrays else None
        return ImageFile(path, image, masks, meta)

    def _png(self, path: Path) -> ImageFile:
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
                    raise DataError(f"is a {im.mode} PNG; give a greyscale (8 or 16 bit) image")
                bits = 16 if im.mode.startswith("I") else 8
                image = np.asarray(im)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"cannot be read as PNG ({type(err).__name__}: {err})") from None
        mask_path = path.with_name(f"{path.stem}_mask.png")
        masks = None
        if mask_path.exists():
            try:
                with Image.open(mask_path) as im:
                    masks = self._masks(np.asarray(im))
            except DataError as err:
                raise DataError(f"mask {mask_path.name}: {err}") from None
            except Exception as err:
                raise DataError(f"mask {mask_path.name} cannot be read ({type(err).__name__}: {err})") from None
        meta: dict[str, Any] = {}
        meta_path = path.with_suffix(".json")
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as err:
                raise DataError(f"metadata {meta_path.name} is not valid JSON ({err})") from None
            if not isinstance(meta, dict):
                raise DataError(f"metadata {meta_path.name} must hold a JSON object")
        return ImageFile(path, self._intensities(image, bits), masks, meta, bits)

    def _intensities(self, image: np.ndarray, bits: int) -> torch.Tensor:
        if image.shape != self.image_shape:
            raise DataError(
                f"image of shape {image.shape}; the model takes {self.image_shape[0]} x {self.image_shape[1]}"
            )
        if image.dtype.kind not in "iuf":
            raise DataError(f"image has dtype {image.dtype}; expected numbers")
        x = image.astype(np.float64)
        if not np.isfinite(x).all():
            raise DataError("image has NaN or Inf pixels")
        if bits:
            x = x / (2**bits - 1) * 2 - 1
        elif self.convention.window is not None:
            lo, hi = self.convention.window
            x = np.clip((x - lo) / (hi - lo) * 2 - 1, -1, 1)
        elif x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6:
            raise DataError(
                f"image values span [{x.min():g}, {x.max():g}], outside [-1, 1]; the model's data had no HU window"
            )
        return torch.from_numpy(np.clip(x, -1, 1).astype(np.float32))

    def _masks(self, mask: np.ndarray) -> torch.Tensor:
        c = self.schema.num_classes
        if mask.ndim == 2:
            if mask.shape != self.image_shape:
                raise DataError(f"mask of shape {mask.shape} differs from the image's {self.image_shape}")
            if mask.dtype.kind not in "iub" and not np.all(mask == np.round(mask)):
                raise DataError("label mask has non-integer values")
            labels = mask.astype(np.int64)
            bad = sorted({int(v) for v in np.unique(labels) if v < 0 or v >= len(self.lut) or self.lut[v] < 0})
            if bad:
                raise DataError(
                    f"mask labels {bad} are not in the label map {sorted(np.flatnonzero(self.lut >= 0).tolist())}"
                )
            classes = torch.from_numpy(self.lut[labels])
            return torch.nn.functional.one_hot(classes, c).permute(2, 0, 1).float()
        if (
            mask.ndim == 3
            and mask.shape[1:] == self.image_shape
            and mask.shape[0] == len(self.lut)
            and (self.lut >= 0).all()
        ):
            out = np.zeros((c, *self.image_shape))
            np.add.at(out, self.lut, mask.astype(np.float64))
            if not np.isfinite(out).all() or out.min() < 0 or np.abs(out.sum(0) - 1).max() > 1e-3:
                raise DataError("soft mask must be finite, >= 0 and sum to 1 over channels")
            return torch.from_numpy(out.astype(np.float32))
        raise DataError(f"mask of shape {mask.shape}: expected (H, W) labels or ({len(self.lut)}, H, W) fractions")

    # -- writing in the input's format ---------------------------------------------------------
    def labels_to_values(self, classes: np.ndarray) -> np.ndarray:
        """(H, W) class indices -> label values of the input's label map."""
        values = np.zeros(len(self.schema.classes), dtype=np.int64)
        for cls, value in self.label_of.items():
            values[cls] = value
        return values[classes]

    def write_like(
        self, source: ImageFile, folder: Path, image: torch.Tensor, classes: torch.Tensor, metadata: Mapping[str, Any]
    ) -> Path:
        """Write ``image`` (H, W) in [-1, 1] and its class mask (H, W) as ``source`` was stored; returns the image path.

        .npz: ``image`` in the input's units (HU when the run had a window), ``mask`` labels, metadata;
        PNG: same bit depth, ``<stem>_mask.png``, metadata in ``<stem>.json``.
        """
        x = image.detach().cpu().double().numpy()
        labels = self.labels_to_values(classes.cpu().numpy())
        if source.bits == 0:
            if self.convention.window is not None:
                lo, hi = self.convention.window
                x = (x + 1) / 2 * (hi - lo) + lo
            path = folder / f"{source.stem}.npz"
            arrays = {k: _array(v) for k, v in metadata.items()}
            return write_item(path, x.astype(np.float32), labels.astype(np.int32), arrays)
        scale = 2**source.bits - 1
        pixels = np.round((x + 1) / 2 * scale).clip(0, scale)
        path = folder / f"{source.stem}.png"
        _save_png(path, pixels.astype(np.uint16 if source.bits == 16 else np.uint8))
        _save_png(folder / f"{source.stem}_mask.png", labels.astype(np.uint8 if labels.max() < 256 else np.uint16))
        atomic_write_json(folder / f"{source.stem}.json", dict(metadata))
        return path


def _array(value: Any) -> np.ndarray:
    """A metadata value as an array the folder reader loads without pickle (anything else as JSON text)."""
    array = np.asarray(value) if not isinstance(value, Mapping) else np.asarray(json.dumps(value))
    return np.asarray(json.dumps(value)) if array.dtype == object else array


def _save_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
