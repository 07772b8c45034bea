"""Fuzz of the ``folder`` data set with files from other tools: corrupted bytes, wrong dtypes and
shapes, bad labels, NaN/Inf, empty folders, mismatched spacing and metadata.

Property: a folder holding one good file and one fuzzed file either loads (and then the fuzzed file
was valid by the rules below, and what is read equals what was written) or raises a DataError
naming the fuzzed file; with ``on_bad_file: skip`` the fuzzed file is instead listed in
``folder_skipped.txt`` with a warning. Never another exception, never a silent drop.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from causalimg.data.folder import FolderConfig, FolderSource
from causalimg.errors import DataError
from causalimg.regions.axial import AxialPartitioner

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SHAPE = (8, 24)  # (H, W): 4 x 12 mm at 0.5 mm
SPACING = 0.5
BAD = "zz_fuzzed"  # sorts after the good file, so the good file fixes the data set's shape


def good_arrays() -> tuple[np.ndarray, np.ndarray]:
    image = np.linspace(-1, 1, SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:6] = 1  # lumen
    mask[2, 3:9] = 3  # non-calcified plaque
    mask[5, 14:17] = 2  # calcium
    return image, mask


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


LABELS = {0: "background", 1: "lumen", 2: "calcified", 3: "noncalcified"}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def load_folder(root: Path, on_bad_file: str = "error") -> FolderSource:
    config = FolderConfig(path=root, spacing_mm=SPACING, on_bad_file=on_bad_file, label_map=LABELS)
    return FolderSource(config, AxialPartitioner(), root / "_out")


def check(write_bad: Callable[[Path], None], valid: bool | None, fragment: str = "") -> str:
    """Write a good file and the fuzzed one, load in both modes and check the property.

    valid: what the rules say about the fuzzed file (None: either outcome, e.g. a byte flip that
    may land where nothing is checked; then a load must return what was written).
    Returns "loaded" or "refused".
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = root / "train"
        train.mkdir()
        image, mask = good_arrays()
        np.savez(train / "good.npz", image=image, mask=mask)
        write_bad(train)
        fuzzed = sorted(
            p.name
            for p in train.iterdir()
            if p.name.startswith(BAD) and not p.stem.endswith("_mask") and p.suffix in (".npz", ".png")
        )
        try:
            source = load_folder(root)
        except DataError as err:
            assert valid is not True, f"a valid file was refused: {err}"
            assert any(f"train/{name}: " in str(err) for name in fuzzed), f"the file is not named: {err}"
            assert fragment in str(err), str(err)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                skipping = load_folder(root, on_bad_file="skip")
            assert [p.name for p, _ in skipping.skipped] == fuzzed
            report = (root / "_out" / "folder_skipped.txt").read_text()
            assert all(name in report for name in fuzzed)
            assert any(f"skipped {len(fuzzed)} unusable" in str(w.message) for w in caught)
            assert len(skipping.split("train")) == 1
            return "refused"
        assert valid is not False, f"an invalid file was accepted: {fuzzed}"
        dataset = source.split("train")
        assert len(dataset) == 1 + len(fuzzed)
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["image"].shape == (1, *SHAPE) and bool(item["image"].isfinite().all())
            assert float(item["image"].abs().max()) <= 1.0 + 1e-6
            assert bool(((item["masks"].sum(0) - 1).abs() < 1e-4).all())
        return "loaded"


# -- corrupted bytes -----------------------------------------------------------------------------
def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "random"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "random":
        return draw(st.binary(max_size=400))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] = draw(st.integers(0, 255)) if how == "overwrite" else out[i] ^ (1 << draw(st.integers(0, 7)))
    return bytes(out)


@SETTINGS
@given(data=st.data())
def test_corrupted_npz_bytes(data):
    image, mask = good_arrays()
    original = npz_bytes(image=image, mask=mask)
    corrupted = mutate(original, data.draw)
    event(check(lambda d: (d / f"{BAD}.npz").write_bytes(corrupted), valid=None if corrupted != original else True))


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["image", "mask"]))
def test_corrupted_png_bytes(data, which):
    image, mask = good_arrays()
    pixels = ((image + 1) * 127.5).round().astype(np.uint8)
    files = {"image": png_bytes(pixels), "mask": png_bytes(mask)}
    files[which] = mutate(files[which], data.draw)

    def write(d: Path) -> None:
        (d / f"{BAD}.png").write_bytes(files["image"])
        (d / f"{BAD}_mask.png").write_bytes(files["mask"])

    event(check(write, valid=None))


# -- arrays of the wrong kind -------------------------------------------------------------------
DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int64", "bool", "complex64", "<U2"]
SHAPES = st.sampled_from(
    [
        SHAPE,
        (),
        (SHAPE[1],),
        (1, *SHAPE),
        (3, *SHAPE),
        (SHAPE[0], 0),
        (0, SHAPE[1]),
        (SHAPE[0], SHAPE[1] + 1),
        (SHAPE[0] - 1, SHAPE[1]),
    ]
)


@st.composite
def arrays(draw: st.DrawFn, kind: str) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(SHAPES)
    if dtype.kind == "U":
        return np.full(shape, "1", dtype)
    if kind == "image":
        values = draw(st.sampled_from([0.0, 0.5, -1.0, 1.0, 2.0, -300.0, np.nan, np.inf, -np.inf]))
    else:
        values = draw(st.sampled_from([0, 1, 2, 3, 4, 7, 255, -1, 1.5, np.nan]))
    base = np.zeros(shape, np.float64)
    if base.size:
        flat = base.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = values
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return base.astype(dtype)


def is_valid_image(a: np.ndarray) -> bool:
    real = a.dtype.kind in "iuf"
    return (
        real
        and a.shape == SHAPE
        and bool(np.isfinite(a.astype(np.float64)).all())
        and float(np.abs(a.astype(np.float64)).max()) <= 1.0
    )


def is_valid_labels(a: np.ndarray) -> bool:
    if a.shape != SHAPE or a.dtype.kind not in "iufb":
        return False
    values = a.astype(np.float64)
    return bool(
        np.isfinite(values).all() and (values == np.round(values)).all() and values.min() >= 0 and values.max() <= 3
    )


@SETTINGS
@given(image=arrays("image"), mask=arrays("mask"))
def test_wrong_dtypes_shapes_labels_and_non_finite_pixels(image, mask):
    valid = is_valid_image(image) and is_valid_labels(mask)
    outcome = check(lambda d: np.savez(d / f"{BAD}.npz", image=image, mask=mask), valid)
    event(outcome)
    assert outcome == ("loaded" if valid else "refused")


@SETTINGS
@given(channels=st.integers(1, 6), value=st.sampled_from([0.0, 0.5, -0.1, 1.2, np.nan, np.inf]), fix_sum=st.booleans())
def test_soft_masks_of_the_wrong_kind(channels, value, fix_sum):
    image, labels = good_arrays()
    soft = np.zeros((channels, *SHAPE), np.float32)
    soft[labels.clip(0, channels - 1), *np.indices(SHAPE)] = 1.0
    soft[0, 0, 0] = value
    if fix_sum and channels > 1:
        soft[1, 0, 0] = 1.0 - value if np.isfinite(value) else 0.0
    total_ok = np.isfinite(soft).all() and soft.min() >= 0 and np.abs(soft.sum(0) - 1).max() <= 1e-3
    valid = bool(channels == 4 and total_ok and (labels < channels).all())
    outcome = check(lambda d: np.savez(d / f"{BAD}.npz", image=image, mask=soft), valid)
    event(outcome)
    assert outcome == ("loaded" if valid else "refused")


# -- fixed cases: object arrays, metadata, spacing, PNG pairs, empty folders -------------------
def _object_array(d: Path) -> None:
    image, mask = good_arrays()
    np.savez(d / f"{BAD}.npz", image=np.array([image, None], dtype=object), mask=mask)


def _pickled_metadata(d: Path) -> None:
    image, mask = good_arrays()
    np.savez(d / f"{BAD}.npz", image=image, mask=mask, extra=np.array([{"a": 1}], dtype=object))


def _spacing(d: Path) -> None:
    image, mask = good_arrays()
    np.savez(d / f"{BAD}.npz", image=image, mask=mask, spacing_mm=np.float64(0.25))


def _other_size(d: Path) -> None:
    np.savez(d / f"{BAD}.npz", image=np.zeros((8, 30), np.float32), mask=np.zeros((8, 30), np.uint8))


def _png_pair(mutate_pair: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]], meta: str | None = None):
    def write(d: Path) -> None:
        image, mask = good_arrays()
        pixels, labels = mutate_pair(((image + 1) * 127.5).round().astype(np.uint8), mask)
        if pixels is not None:
            Image.fromarray(pixels).save(d / f"{BAD}.png")
        if labels is not None:
            Image.fromarray(labels).save(d / f"{BAD}_mask.png")
        if meta is not None:
            (d / f"{BAD}.json").write_text(meta)

    return write


def _zip_member(d: Path) -> None:
    with zipfile.ZipFile(d / f"{BAD}.npz", "w") as zf:
        zf.writestr("image.npy", b"\x93NUMPY\x01\x00garbage")
        zf.writestr("mask.npy", b"")


FIXED = {
    "object array (pickle)": (_object_array, "cannot be read as .npz"),
    "object metadata (pickle)": (_pickled_metadata, "cannot be read as .npz"),
    "spacing differs": (_spacing, "spacing_mm 0.25 differs from data.spacing_mm 0.5"),
    "image size differs": (_other_size, "differs from the data set's"),
    "npz members not arrays": (_zip_member, "cannot be read as .npz"),
    "png without mask": (_png_pair(lambda p, m: (p, None)), "has no mask file"),
    "png mask of another size": (_png_pair(lambda p, m: (p, m[:, :10].copy())), "differs from image shape"),
    "png RGB image": (_png_pair(lambda p, m: (np.stack([p] * 3, -1), m)), "image must be 2-D"),
    "png labels outside label_map": (_png_pair(lambda p, m: (p, m + 5)), "not in label_map"),
    "png metadata not JSON": (_png_pair(lambda p, m: (p, m), "{not json"), "is not valid JSON"),
    "png metadata not a mapping": (_png_pair(lambda p, m: (p, m), "[1, 2]"), "must hold a JSON object"),
    "png metadata spacing differs": (_png_pair(lambda p, m: (p, m), '{"spacing_mm": 1.0}'), "spacing_mm 1 differs"),
}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_fixed_bad_files_are_named_or_skipped(case):
    write, fragment = FIXED[case]
    assert check(write, valid=False, fragment=fragment) == "refused"


def test_matching_spacing_metadata_and_16_bit_png_load():
    def write(d: Path) -> None:
        image, mask = good_arrays()
        Image.fromarray(((image + 1) * 32767.5).round().astype(np.uint16)).save(d / f"{BAD}.png")
        Image.fromarray(mask).save(d / f"{BAD}_mask.png")
        (d / f"{BAD}.json").write_text(json.dumps({"spacing_mm": SPACING}))

    assert check(write, valid=True) == "loaded"


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        ({}, "has none of the split folders"),
        ({"train": []}, "train: no usable"),
        ({"train": ["notes.txt", "a_mask.png"]}, "train: no usable"),
        ({"train": ["good.npz"], "val": []}, "val: no usable"),
    ],
)
def test_empty_folders_are_errors_naming_the_folder(tmp_path, layout, fragment):
    image, mask = good_arrays()
    for split, names in layout.items():
        (tmp_path / split).mkdir()
        for name in names:
            path = tmp_path / split / name
            if name.endswith(".npz"):
                np.savez(path, image=image, mask=mask)
            elif name.endswith(".png"):
                Image.fromarray(mask).save(path)
            else:
                path.write_text("x")
    with pytest.raises(DataError, match=fragment):
        load_folder(tmp_path)


def test_a_file_broken_after_the_scan_is_named_when_read(tmp_path):
    (tmp_path / "train").mkdir()
    image, mask = good_arrays()
    np.savez(tmp_path / "train" / "a.npz", image=image, mask=mask)
    dataset = load_folder(tmp_path).split("train")
    (tmp_path / "train" / "a.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"train/a.npz: cannot be read"):
        dataset[0]
