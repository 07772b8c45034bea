"""The stage mechanism with fake stages: hashing, skip/redo, atomicity, --only/--from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from causalimg.errors import ConfigError, DataError, DiskFullError
from causalimg.io import atomic_path, atomic_write_json
from causalimg.pipeline import outputs
from causalimg.pipeline.stage import DONE, Stage, StageContext, config_hash, run_stages, stage_hashes


class Recorder:
    """Fake stage bodies that count their calls and write one output file."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()

    def body(self, ctx: StageContext) -> dict:
        self.calls.append(ctx.name)
        for upstream in ctx.inputs.values():
            assert (upstream / "out.json").exists()  # upstream outputs are visible
        (ctx.dir / "partial.txt").write_text("half")
        if ctx.name in self.fail:
            raise RuntimeError(f"{ctx.name} interrupted")
        atomic_write_json(ctx.dir / "out.json", {"stage": ctx.name})
        return {"value": len(self.calls)}


def pipeline(rec: Recorder, strategies=("none", "pos")) -> list[Stage]:
    stages = [
        Stage("data", rec.body, {"n": 8}),
        Stage("pretrain", rec.body, {"steps": 3}, ("data",)),
    ]
    for s in strategies:
        stages.append(Stage(f"finetune/{s}", rec.body, {"strategy": s}, ("pretrain",)))
    stages.append(Stage("report", rec.body, {}, tuple(f"finetune/{s}" for s in strategies)))
    return stages


def run(stages, tmp_path, **kw):
    return run_stages(stages, tmp_path, log=lambda _: None, **kw)


def test_hash_is_canonical_and_depends_on_upstream():
    assert config_hash({"a": 1, "b": [1, 2]}, {}) == config_hash({"b": [1, 2], "a": 1}, {})
    assert config_hash({"a": 1}, {"up": "x"}) != config_hash({"a": 1}, {"up": "y"})
    rec = Recorder()
    base = stage_hashes(pipeline(rec))
    changed = stage_hashes([Stage("data", rec.body, {"n": 9}), *pipeline(rec)[1:]])
    assert all(base[name] != changed[name] for name in base)


def test_rerun_skips_and_one_changed_branch_redoes_only_its_descendants(tmp_path):
    rec = Recorder()
    first = run(pipeline(rec), tmp_path)
    assert rec.calls == ["data", "pretrain", "finetune/none", "finetune/pos", "report"]
    assert all(r.status == "ran" for r in first.values())
    rec.calls.clear()
    again = run(pipeline(rec), tmp_path)
    assert rec.calls == [] and all(r.status == "skipped" for r in again.values())
    assert again["report"].summary == {"value": 5}
    rec.calls.clear()
    run(pipeline(rec, strategies=("none", "pos", "reg")), tmp_path)
    assert rec.calls == ["finetune/reg", "report"]


def test_changed_config_clears_stale_outputs(tmp_path):
    rec = Recorder()
    run(pipeline(rec), tmp_path)
    (tmp_path / "pretrain" / "stale-checkpoint").write_text("old")
    stages = pipeline(rec)
    stages[1] = Stage("pretrain", rec.body, {"steps": 4}, ("data",))
    rec.calls.clear()
    run(stages, tmp_path)
    assert rec.calls == ["pretrain", "finetune/none", "finetune/pos", "report"]
    assert not (tmp_path / "pretrain" / "stale-checkpoint").exists()


def test_interrupted_stage_is_never_complete_and_keeps_its_own_files_for_resume(tmp_path):
    rec = Recorder()
    rec.fail = {"finetune/pos"}
    with pytest.raises(RuntimeError, match="interrupted"):
        run(pipeline(rec), tmp_path)
    assert not (tmp_path / "finetune/pos" / DONE).exists()
    assert (tmp_path / "finetune/pos" / "partial.txt").exists()  # same hash: checkpoints survive
    rec.fail.clear()
    rec.calls.clear()
    run(pipeline(rec), tmp_path)
    assert rec.calls == ["finetune/pos", "report"]


def test_torn_done_file_is_not_completion(tmp_path):
    rec = Recorder()
    run(pipeline(rec), tmp_path)
    (tmp_path / "report" / DONE).write_text('{"hash": "')
    rec.calls.clear()
    run(pipeline(rec), tmp_path)
    assert rec.calls == ["report"]


def test_only_redoes_one_stage_and_makes_descendants_stale(tmp_path):
    rec = Recorder()
    run(pipeline(rec), tmp_path)
    rec.calls.clear()
    results = run(pipeline(rec), tmp_path, only="finetune/none")
    assert rec.calls == ["finetune/none"]
    assert set(results) == {"data", "pretrain", "finetune/none"}
    rec.calls.clear()
    run(pipeline(rec), tmp_path)
    assert rec.calls == ["report"]  # built on the old finetune-none outputs, so redone


def test_a_group_name_selects_every_stage_of_the_group(tmp_path):
    rec = Recorder()
    run(pipeline(rec), tmp_path)
    rec.calls.clear()
    run(pipeline(rec), tmp_path, only="finetune")
    assert rec.calls == ["finetune/none", "finetune/pos"]
    assert (tmp_path / "finetune" / "pos" / DONE).exists()


def test_from_redoes_the_stage_and_everything_after(tmp_path):
    rec = Recorder()
    run(pipeline(rec), tmp_path)
    rec.calls.clear()
    run(pipeline(rec), tmp_path, start="finetune/none")
    assert rec.calls == ["finetune/none", "finetune/pos", "report"]


def test_selection_errors_name_the_problem(tmp_path):
    rec = Recorder()
    with pytest.raises(ConfigError, match="'pretrian' is not a stage"):
        run(pipeline(rec), tmp_path, only="pretrian")
    with pytest.raises(ConfigError, match="stage 'data' is not complete"):
        run(pipeline(rec), tmp_path, only="report")
    with pytest.raises(ConfigError, match="cannot be combined"):
        run(pipeline(rec), tmp_path, only="report", start="data")
    with pytest.raises(ConfigError, match="do not come before it"):
        stage_hashes([Stage("a", rec.body, upstream=("b",)), Stage("b", rec.body)])


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"good")
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_done_file_records_hash_timings_and_config(tmp_path):
    rec = Recorder()
    results = run(pipeline(rec), tmp_path)
    done = json.loads((tmp_path / "pretrain" / DONE).read_text())
    assert done["hash"] == results["pretrain"].hash and done["seconds"] >= 0
    config = json.loads((Path(tmp_path) / "pretrain" / "config.json").read_text())
    assert config["config"] == {"steps": 3} and config["upstream"] == ["data"]


def test_a_file_changed_or_deleted_after_a_stage_finished_is_named_on_the_next_run(tmp_path):
    rec = Recorder()
    run(pipeline(rec), tmp_path)
    out = tmp_path / "pretrain" / "out.json"
    out.write_text(out.read_text().replace("pretrain", "pretrian"))  # same size, other bytes
    with pytest.raises(DataError, match=r"stage 'pretrain'.*pretrain/out.json changed.*delete the folder"):
        run(pipeline(rec), tmp_path)
    out.unlink()
    with pytest.raises(DataError, match="out.json is missing"):
        run(pipeline(rec), tmp_path)
    (tmp_path / "pretrain" / "checkpoints").mkdir()
    (tmp_path / "data" / "checkpoints").mkdir()
    (tmp_path / "data" / "checkpoints" / "state.json").write_text("{}")  # checkpoints are not outputs
    rec.calls.clear()
    shutil.rmtree(tmp_path / "pretrain")
    run(pipeline(rec), tmp_path)
    assert rec.calls == ["pretrain", "finetune/none", "finetune/pos", "report"]


def test_large_files_are_digested_by_sampled_blocks_that_still_see_a_rewrite(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "WHOLE_BYTES", 1000)
    monkeypatch.setattr(outputs, "BLOCK", 100)
    path = tmp_path / "cache.npy"
    path.write_bytes(bytes(range(256)) * 40)
    before = outputs.digest(path)
    assert before.startswith("sampled:")
    data = bytearray(path.read_bytes())
    data[5000] ^= 1  # one bit in the middle, inside one of the sampled blocks spread over the whole file
    path.write_bytes(bytes(data))
    files = {"cache.npy": {"size": path.stat().st_size, "digest": before}}
    assert outputs.changed(tmp_path, files) == [f"{path} changed"]


def test_a_full_disk_in_the_middle_of_a_stage_is_one_message_and_leaves_it_incomplete(tmp_path, monkeypatch):
    rec = Recorder()

    def body(ctx):
        (ctx.dir / "half.bin").write_bytes(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")  # torch's words

    monkeypatch.setattr("causalimg.pipeline.stage.free_bytes", lambda path: 1024)
    monkeypatch.setattr("causalimg.io.free_bytes", lambda path: 1024)
    stages = [Stage("data", rec.body, {"n": 8}), Stage("pretrain", body, {"steps": 3}, ("data",))]
    with pytest.raises(DiskFullError, match=r"no space left.*pretrain.*0 MiB free.*--resume"):
        run(stages, tmp_path)
    assert not (tmp_path / "pretrain" / DONE).exists()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room, the same error is no disk problem
        run(stages, tmp_path)
