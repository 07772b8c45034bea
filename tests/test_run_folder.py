"""A run folder belongs to one run, moves with it, and a config that cannot run never makes one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from causalimg import run
from causalimg.errors import RunLockedError
from causalimg.pipeline.lock import LOCK_FILE, hold_run_folder


def tiny(run_dir: Path, *sets: str) -> list[str]:
    return ["--config", "tiny", "--set", f"run.dir={run_dir}", *(a for s in sets for a in ("--set", s))]


def test_a_second_run_on_a_held_folder_is_refused_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with hold_run_folder(folder):
        result = subprocess.run(  # refused at once, not queued behind the holder (a wait would time out)
            [sys.executable, "-m", "causalimg.run", *tiny(folder), "--dry-run"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert f"is in use by process {os.getpid()} on host" in result.stderr
        assert "Traceback" not in result.stderr and not (folder / "config.yaml").exists()
        with pytest.raises(RunLockedError), hold_run_folder(folder):
            pass
    # the holder ended: its lock went with it, though the file stays
    assert (folder / LOCK_FILE).exists()
    assert run.main([*tiny(folder), "--dry-run"]) == 0


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "run"
    code = f"from causalimg.pipeline.lock import hold_run_folder; import time\nwith hold_run_folder({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"process {holder.pid}"), hold_run_folder(folder):
        pass
    holder.kill()
    holder.wait()
    with hold_run_folder(folder):
        pass


def test_a_moved_or_copied_run_folder_resumes_where_it_lies(tmp_path, capsys):
    first = tmp_path / "first"
    assert run.main([*tiny(first), "--dry-run"]) == 0
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, copy)
    assert run.main([*tiny(copy), "--dry-run", "--resume"]) == 0
    assert run.main([*tiny(copy), "--dry-run", "--resume", "--set", "run.seed=3"]) == 2
    assert "config differs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.batch_size=64", "pretrain.batch_size = 64 exceeds the 32 training images"),
        ("predictors.segmentor.train.batch_size=20", "predictors.segmentor.train.batch_size = 20 exceeds the 16"),
        ("evaluate.num_images=5", "evaluate.num_images = 5 exceeds the 4 images of the test split"),
        ("predictors.segmentor.widths=[4, 8, 16, 32, 64, 128]", "its sides must divide by 32"),
        ("report.figure.structure=stent", "report.figure.structure = 'stent' is not a structure"),
        ("regions={name: grid, rows: 2, cols: 3}", "data:"),
        ("image_mechanism={name: hvae, preset: null, widths: [8], enc_blocks: [1], dec_blocks: [1], "
         "bottleneck: 0.5, z_dim: 2, embed_dim: 4}", "image_mechanism: hvae.widths has 1 entries"),
    ],
)  # fmt: skip
def test_what_the_data_and_architectures_make_impossible_is_refused_before_any_stage(
    tmp_path, capsys, override, message
):
    folder = tmp_path / "run"
    assert run.main(tiny(folder, override)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err) < 1000, err
    assert not folder.exists()


def test_a_mechanism_fine_tuned_with_its_own_batch_size_is_checked_against_the_data_by_its_own_path(tmp_path, capsys):
    folder = tmp_path / "run"
    flow = "{name: flow-matching, widths: [8, 16], blocks: [1, 1], embed_dim: 16, steps: 2}"
    sets = (f"compare_mechanisms={{fm: {flow}}}", "finetune.per_mechanism={fm: {train: {batch_size: 64}}}")
    assert run.main(tiny(folder, *sets)) == 2
    err = capsys.readouterr().err
    assert "finetune.per_mechanism.fm.train.batch_size = 64 exceeds the 32 training images" in err, err
    assert "finetune.train.batch_size" not in err and not folder.exists()
