"""Untrusted files and plugins: a malicious pickle reaches every public weight-loading path and
runs nowhere; run.dir cannot escape by ``..`` (and an unusable one is refused up front); plugins load only from entry points and named
directories; a plugin failing on import or registration stops the run by name, leaving nothing.

Already tested elsewhere (not repeated here): resuming
with tampered optimizer/RNG pickles (tests/test_training_loop.py), YAML python tags through both
command lines (tests/test_fuzz_config.py), pickled object arrays in folder .npz files
(tests/test_fuzz_folder.py), plugin errors inside the manager (tests/test_plugin_manager.py).
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import TOY_CONFIG
from torch import nn

from causalimg import cli, run
from causalimg.config.loader import resolve_config_path
from causalimg.core.transform import VariableTransform
from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.errors import DataError
from causalimg.io import load_module
from causalimg.mechanisms.hvae import HVAE, HVAEConfig
from causalimg.predictors import frozen
from causalimg.predictors.configs import RegressorConfig, SegmentorConfig
from causalimg.predictors.regressor import build_regressor
from causalimg.predictors.unet import UNet
from causalimg.regions.axial import AxialPartitioner


class Payload:
    """Unpickling this runs ``touch marker``: the test's proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_files(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a raw pickle and as a torch.save zip, under weight-like names."""
    payload = {"weight": Payload(marker)}
    files = {}
    for name in ("weights.pt", "weights.bin", "weights.pkl", "weights.ckpt", "weights.safetensors"):
        files[f"pickle:{name}"] = folder / f"p_{name}"
        files[f"pickle:{name}"].write_bytes(pickle.dumps(payload, protocol=2))
        files[f"torch.save:{name}"] = folder / f"t_{name}"
        torch.save(payload, files[f"torch.save:{name}"])
    return files


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "pwned"
    files = evil_files(folder, marker)
    torch.load(files["torch.save:weights.pt"], weights_only=False)  # the payload is live ...
    assert marker.exists()
    marker.unlink()  # ... and every test below checks it never runs again
    return files, marker


def _hvae() -> HVAE:
    return HVAE.from_config(HVAEConfig(preset="cpu"), image_shape=(16, 96), num_parents=9)


LOADERS: dict[str, Callable[[Path], Any]] = {
    "predictors.frozen.load_frozen(UNet)": lambda p: frozen.load_frozen(
        UNet(SegmentorConfig(widths=(4, 8)), num_classes=4), p
    ),
    "predictors.frozen.load_frozen(regressor)": lambda p: frozen.load_frozen(
        build_regressor(RegressorConfig(model="resnet10t"), 3), p
    ),
    "io.load_module(HVAE)": lambda p: load_module(_hvae(), p),
    "io.load_module(flows, prefix)": lambda p: load_module(nn.ModuleDict({"a": nn.Linear(1, 1)}), p, "attributes."),
    "core.transform.VariableTransform.load": VariableTransform.load,
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_malicious_pickles_are_refused_by_every_weight_loader(evil, loader):
    files, marker = evil
    for kind, path in files.items():
        with pytest.raises(DataError, match=path.name):
            LOADERS[loader](path)
        assert not marker.exists(), f"{loader} ran the payload of {kind}"


def test_tampered_phantom_cache_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    config = PhantomConfig(n_train=2, n_val=1, n_test=1)
    PhantomSource(config, AxialPartitioner(), tmp_path).split("train")[0]  # writes the cache
    cached = sorted(tmp_path.glob("phantom-*/train-2/*.npy"))
    assert cached
    for i, path in enumerate(cached):  # a raw pickle, then .npy files of pickled objects
        if i == 0:
            path.write_bytes(pickle.dumps(Payload(marker)))
        else:
            np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="phantom cache .* is unreadable"):
        PhantomSource(config, AxialPartitioner(), tmp_path).split("train")[0]
    assert not marker.exists()


# -- run directory escape ------------------------------------------------------------------------
@pytest.fixture
def toy_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped tiny config with a relative run folder, as a file in a working folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = work / "exp.yaml"
    raw = yaml.safe_load(resolve_config_path("tiny").read_text())
    path.write_text(yaml.safe_dump({**raw, "run": {"dir": "runs/a", "seed": 0}}))
    return path


@pytest.mark.parametrize("run_dir", ["../escaped", "runs/../../escaped", "./runs/../../../escaped"])
def test_run_dir_cannot_escape_the_working_directory_by_dotdot(toy_config, tmp_path, capsys, run_dir):
    assert run.main(["--config", str(toy_config), "--set", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"run.dir = {str(Path(run_dir))!r} leaves the working directory" in err and "Traceback" not in err
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_an_absolute_run_dir_outside_is_allowed_on_purpose(toy_config, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    assert cli.main(["validate", str(toy_config), "--show", "--set", f"run.dir={outside}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["dir"] == str(outside)


def test_an_unusable_run_dir_is_a_clear_error_before_anything_runs(toy_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for run_dir in (blocker, blocker / "run"):
        assert run.main(["--config", str(toy_config), "--dry-run", "--set", f"run.dir={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert f"run.dir {str(run_dir)!r} is not writable" in err and "Traceback" not in err
    assert blocker.read_text() == "keep me"


# -- where plugins come from ---------------------------------------------------------------------
INTRUDER = """
import pathlib
pathlib.Path({marker!r}).touch()
from typing import Literal
import causalimg
from causalimg.strict import StrictModel
from causalimg.plugins import specs

class IntruderConfig(StrictModel):
    name: Literal["intruder"] = "intruder"

@causalimg.hookimpl
def causalimg_region_partitioners():
    return [specs.PartitionerSpec("intruder", IntruderConfig, IntruderConfig, "Loaded without being named")]
"""


def test_plugins_load_only_from_entry_points_and_named_directories(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported"
    work = tmp_path / "work"
    places = [work, work / "plugins", work / "runs" / "a", tmp_path / "configs"]
    for place in places:  # the working directory, a `plugins/` folder, the run dir, the config's folder
        place.mkdir(parents=True, exist_ok=True)
        (place / "intruder.py").write_text(INTRUDER.format(marker=str(marker)))
        (place / "causalimg_intruder.py").write_text(
            INTRUDER.format(marker=str(marker)).replace('"intruder', '"intruder-2')
        )
    monkeypatch.chdir(work)
    config = tmp_path / "configs" / "exp.yaml"
    config.write_text(yaml.safe_dump({**TOY_CONFIG, "data": "phantom", "regions": "axial-thirds"}))
    assert cli.main(["plugins"]) == 0
    assert "intruder" not in capsys.readouterr().out
    cli.main(["validate", str(config)])
    assert "intruder" not in capsys.readouterr().err
    assert not marker.exists(), "a plugin that nobody named was imported"
    assert cli.main(["plugins", "--plugins-dir", str(work / "plugins")]) == 0  # named: loaded
    assert "intruder" in capsys.readouterr().out and marker.exists()


BROKEN = {
    "raises on import": (
        "raise RuntimeError('import boom')\n",
        r"one-file plugin '.*bad\.py' failed to import: RuntimeError: import boom",
    ),
    "raises in its hook": (
        "import causalimg\n@causalimg.hookimpl\ndef causalimg_metrics():\n    raise KeyError('hook boom')\n",
        r"plugin 'bad' \(.*bad\.py\) failed in hook causalimg_metrics: KeyError: 'hook boom'",
    ),
    "misspelled hook": (
        "import causalimg\n@causalimg.hookimpl\ndef causalimg_metric():\n    return []\n",
        r"plugin 'bad' \(.*bad\.py\).*causalimg_metric",
    ),
    "returns a wrong record": (
        "import causalimg\n@causalimg.hookimpl\ndef causalimg_metrics():\n    return ['fid']\n",
        r"plugin 'bad' \(.*bad\.py\) hook causalimg_metrics returned 'fid'",
    ),
    "calls sys.exit(0) on import": ("import sys\nsys.exit(0)\n", r"bad\.py' failed to import: SystemExit: 0"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_plugin_stops_the_run_by_name_and_leaves_nothing(tmp_path, monkeypatch, capsys, case):
    source, message = BROKEN[case]
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad.py").write_text(source)
    run_dir = tmp_path / "run"
    config = tmp_path / "exp.yaml"
    raw = yaml.safe_load(resolve_config_path("tiny").read_text())
    config.write_text(yaml.safe_dump({**raw, "plugins": {"dirs": [str(plugins)]}, "run": {"dir": str(run_dir)}}))
    modules_before = set(sys.modules)
    assert run.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) <= 3, err
    assert re.search(message, err), err
    assert not run_dir.exists(), "the run started although a plugin failed"
    if "import" in case:
        assert not {m for m in set(sys.modules) - modules_before if "bad" in m}, "half-imported module left behind"
    (plugins / "bad.py").unlink()  # no registry outlives a load: without the file the same config is valid
    assert cli.main(["validate", str(config)]) == 0
