"""Exporting the phantom to the folder format: the folder data set gives back its images and parents."""

from __future__ import annotations

import json

import numpy as np
import torch
import yaml

from causalimg import cli
from causalimg.data.folder import FolderConfig, FolderSource
from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.data.phantom_export import export_phantom
from causalimg.regions.landmarks import LandmarkPartitioner
from causalimg.testing import check_data_source

REGIONS = ("p", "m1", "m2", "d")


def test_folder_reproduces_the_phantoms_images_and_parents(tmp_path):
    part = LandmarkPartitioner(REGIONS)
    phantom = PhantomSource(PhantomConfig(n_train=5, n_val=2, n_test=2, cache=False), part, tmp_path / "cache")
    out = tmp_path / "export"
    assert export_phantom(phantom, out, ["train", "val"]) == [out / "train", out / "val"]
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"{i}.npz" for i in range(5)]
    described = json.loads((out / "dataset.json").read_text())
    assert described["structures"]["calcified"] == {"variable": "cpa", "title": "calcified plaque area",
                                                    "abbreviation": "CPA"}  # fmt: skip
    folder = FolderSource(FolderConfig(path=out), part, tmp_path / "folder")  # everything else from dataset.json
    assert folder.schema == phantom.schema and folder.image_shape == phantom.image_shape
    check_data_source(folder)
    check_data_source(folder, "val")
    for split, n in (("train", 5), ("val", 2)):
        mine, theirs = phantom.split(split), folder.split(split)
        for i in range(n):
            a, b = mine[i], theirs[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
            assert torch.equal(a["regions"], b["regions"]), "the landmarks travel as metadata"
            torch.testing.assert_close(b["parents"], a["parents"], rtol=1e-6, atol=1e-5)


def test_export_command_writes_the_configured_phantom(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"run": {"dir": "runs/x"}, "data": {"name": "phantom", "n_train": 3,
                                      "n_val": 1, "n_test": 1, "cache": False, "age_effect": 0.3}}))  # fmt: skip
    argv = ["export-phantom", str(config), "--set", "regions.name=axial", "--out", "ex", "--splits", "test"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == "ex/test"
    with np.load(tmp_path / "ex" / "test" / "0.npz") as f:
        assert f["image"].shape == (32, 192) and f["mask"].shape == (4, 32, 192)
        assert f["boundaries_mm"].shape == (2,) and float(f["spacing_mm"]) == 0.5 and 40 <= float(f["age"]) <= 80
    assert cli.main([*argv[:-2], "--splits", "tests"]) == 2
    assert "--splits tests: choose among train, val, test" in capsys.readouterr().err
