"""The folder data set: users' files, parents measured from masks, and every bad input named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causalimg.core.regions import variable_areas
from causalimg.data.folder import FolderConfig, FolderSource
from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.data.phantom_render import soft_masks
from causalimg.errors import DataError
from causalimg.plugins.manager import load_registry
from causalimg.regions.axial import AxialPartitioner
from causalimg.regions.landmarks import LandmarkPartitioner
from causalimg.testing import check_data_source

THIRDS = AxialPartitioner()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> PhantomSource:
    return PhantomSource(PhantomConfig(n_train=6, n_val=2, n_test=2, cache=False), THIRDS, tmp_path_factory.mktemp("p"))


def write_npz_folder(root: Path, phantom: PhantomSource, soft: bool) -> None:
    for split, n in (("train", 6), ("val", 2)):
        (root / split).mkdir(parents=True)
        r = phantom.render_indices(split, np.arange(n))
        masks = soft_masks(r.fg)  # (N, 4, H, W)
        for i in range(n):
            mask = masks[i] if soft else masks[i].argmax(0).astype(np.uint8)
            np.savez(root / split / f"case{i:03d}.npz", image=r.image[i, 0], mask=mask, boundaries_mm=[32.0, 64.0])


# The phantom's classes and variable names, as a folder of exported phantom images would describe them.
CORONARY = {
    "label_map": {0: "background", 1: "lumen", 2: "calcified", 3: "noncalcified"},
    "structures": {"calcified": {"variable": "cpa"}, "noncalcified": {"variable": "ncpa"}, "lumen": {"variable": "la"}},
}


def source(root: Path, partitioner=THIRDS, **kw) -> FolderSource:
    config = FolderConfig(path=root, spacing_mm=0.5, **{**CORONARY, **kw})
    return FolderSource(config, partitioner, root / "_out")


def test_parents_from_soft_masks_match_the_phantom(tmp_path, phantom):
    write_npz_folder(tmp_path, phantom, soft=True)
    folder = source(tmp_path)
    check_data_source(folder)
    check_data_source(folder, "val")
    expected = torch.from_numpy(phantom.render_indices("train", np.arange(6)).parents)
    got = torch.stack([folder.split("train")[i]["parents"] for i in range(6)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(folder.split("train")[2]["image"], phantom.split("train")[2]["image"])


def test_hard_labels_and_landmarks_from_metadata(tmp_path, phantom):
    write_npz_folder(tmp_path, phantom, soft=False)
    folder = source(tmp_path, partitioner=LandmarkPartitioner())
    check_data_source(folder)
    item = folder.split("train")[0]
    one_hot = torch.nn.functional.one_hot(item["labels"], 4).permute(2, 0, 1).float()[None]
    torch.testing.assert_close(
        item["parents"], variable_areas(one_hot, THIRDS.masks(32, 192, 0.5)[None], 0.25, (2, 3, 1))[0]
    )
    assert torch.equal(item["regions"], THIRDS.masks(32, 192, 0.5))  # boundaries_mm = [32, 64] in the file


def test_png_pairs_with_a_label_map_and_the_registry(tmp_path):
    (tmp_path / "train").mkdir()
    labels = np.zeros((32, 192), np.uint8)
    labels[12:20] = 5  # lumen is label 5 in these files
    labels[10:12, 70:90] = 9  # non-calcified plaque is 9
    Image.fromarray(np.full((32, 192), 128, np.uint8)).save(tmp_path / "train" / "a.png")
    Image.fromarray(labels).save(tmp_path / "train" / "a_mask.png")
    spec = load_registry().get("dataset", "folder")
    config = spec.config(path=tmp_path, spacing_mm=0.5, label_map={0: "background", 5: "lumen", 9: "noncalcified"})
    folder = spec.factory(config, partitioner=THIRDS, root=tmp_path / "_out")
    check_data_source(folder)
    assert folder.schema.classes == ("background", "lumen", "noncalcified")
    parents = dict(zip(folder.schema.names, folder.split("train")[0]["parents"].tolist()))
    assert set(parents) == {f"{s}_{r}" for s in ("lumen", "noncalcified") for r in ("proximal", "mid", "distal")}
    assert parents["lumen_proximal"] == 8 * 64 * 0.25 and parents["noncalcified_mid"] == 2 * 20 * 0.25


def test_any_structures_named_by_the_folder_description(tmp_path):
    """Two structures of another anatomy, described by the folder's dataset.json; config fields override it."""
    (tmp_path / "train").mkdir()
    labels = np.zeros((16, 96), np.uint8)
    labels[6:10] = 1  # vessel
    labels[5, 20:40] = 2  # stent struts, in the near half
    np.savez(tmp_path / "train" / "a.npz", image=np.zeros((16, 96), np.float32), mask=labels)
    description = {"label_map": {"0": "tissue", "1": "vessel", "2": "stent"}, "spacing_mm": 1.0,
                   "structures": {"stent": {"variable": "stent", "title": "stent area"}, "vessel": {}}}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(description))
    folder = FolderSource(FolderConfig(path=tmp_path), AxialPartitioner(("near", "far")), tmp_path / "_out")
    check_data_source(folder)
    assert folder.schema.names == ("stent_near", "stent_far", "vessel_near", "vessel_far")
    assert folder.split("train")[0]["parents"].tolist() == [20.0, 0.0, 4 * 48.0, 4 * 48.0]
    assert folder.schema.display("stent_far") == "STENT-far"
    halved = FolderSource(
        FolderConfig(path=tmp_path, spacing_mm=0.5), AxialPartitioner(("near", "far")), tmp_path / "_o2"
    )
    assert halved.split("train")[0]["parents"][0] == 20.0 * 0.25  # the config's spacing overrides the description
    (tmp_path / "dataset.json").write_text(json.dumps({**description, "colour": "red"}))
    with pytest.raises(DataError, match="unknown fields \\['colour'\\]"):
        FolderSource(FolderConfig(path=tmp_path), AxialPartitioner(), tmp_path / "_o3")


def bad_files(root: Path) -> dict[str, str]:
    """One broken file per problem; returns file name -> expected message fragment."""
    d = root / "train"
    d.mkdir(parents=True)
    img, lab = np.zeros((32, 192), np.float32), np.zeros((32, 192), np.uint8)
    np.savez(d / "good.npz", image=img, mask=lab)
    np.savez(d / "shape.npz", image=img, mask=lab[:, :100])
    np.savez(d / "labels.npz", image=img, mask=lab + 7)
    np.savez(d / "nan.npz", image=np.where(lab == 0, np.nan, 0.0), mask=lab)
    np.savez(d / "threed.npz", image=img[None], mask=lab)
    np.savez(d / "nomask.npz", image=img)
    np.savez(d / "range.npz", image=img + 300.0, mask=lab)
    (d / "corrupt.npz").write_bytes(b"not a zip file")
    Image.fromarray(lab).save(d / "lonely.png")
    return {
        "shape.npz": "mask shape (32, 100) differs from image shape (32, 192)",
        "labels.npz": "mask labels [7] are not in label_map",
        "nan.npz": "NaN or Inf pixels",
        "threed.npz": "image must be 2-D",
        "nomask.npz": "has no 'mask' array",
        "range.npz": "outside [-1, 1]; set data.window",
        "corrupt.npz": "cannot be read as .npz",
        "lonely.png": "has no mask file lonely_mask.png",
    }


@pytest.mark.parametrize(
    "bad", ["shape.npz", "labels.npz", "nan.npz", "threed.npz", "nomask.npz", "range.npz", "corrupt.npz", "lonely.png"]
)
def test_every_bad_file_is_an_error_naming_it(tmp_path, bad):
    expected = bad_files(tmp_path)
    for name in expected:
        if name != bad:
            (tmp_path / "train" / name).unlink()
    with pytest.raises(DataError, match=rf"train/{re.escape(bad)}: .*{re.escape(expected[bad])}"):
        source(tmp_path)


def test_skip_lists_every_skipped_file(tmp_path):
    expected = bad_files(tmp_path)
    with pytest.warns(UserWarning, match="skipped 8 unusable files"):
        folder = source(tmp_path, on_bad_file="skip")
    assert len(folder.split("train")) == 1
    assert sorted(p.name for p, _ in folder.skipped) == sorted(expected)
    report = (tmp_path / "_out" / "folder_skipped.txt").read_text()
    assert all(name in report for name in expected)


def test_window_maps_hu_and_empty_folders_are_errors(tmp_path):
    (tmp_path / "train").mkdir()
    np.savez(tmp_path / "train" / "hu.npz", image=np.full((4, 6), 225.0), mask=np.zeros((4, 6), np.int64))
    folder = source(tmp_path, window=(-200.0, 650.0))
    assert torch.allclose(folder.split("train")[0]["image"], torch.zeros(1, 4, 6))
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="val: no usable"):
        source(tmp_path, window=(-200.0, 650.0))
    with pytest.raises(DataError, match="has none of the split folders"):
        source(tmp_path / "train")
