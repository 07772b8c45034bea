"""A user's own partitioner (installed as a plugin) and a user's own anatomy, each through a whole run.

The first runs the phantom with the tutorial's out-of-tree partitioner cut into four regions; the
second runs a folder data set of another anatomy (a vessel and a stent) with two structures. Both
end in a report whose Table 1 has one column per region and one block per structure x region.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from causalimg.config.loader import load_config
from causalimg.pipeline.graph import run_pipeline
from causalimg.plugins.manager import load_registry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def table1(run_dir: Path) -> list[str]:
    return (run_dir / "report" / "table1.md").read_text().splitlines()


def test_a_four_region_partitioner_from_its_entry_point_runs_on_the_phantom(tmp_path):
    registry = load_registry()
    assert registry.origin("partitioner", "unequal-axial").source == "entry-point"
    regions = "{name: unequal-axial, region_names: [ostial, proximal, mid, distal], lengths_mm: [16.0, 24.0, 28.0]}"
    config = load_config("tiny", [f"run.dir={tmp_path / 'run'}", f"regions={regions}"], registry)
    run_pipeline(config, registry)
    lines = table1(tmp_path / "run")
    assert lines[2] == "| intervention | strategy | ostial | proximal | mid | distal |"
    blocks = [line.split("|")[1].strip() for line in lines[4:] if line.startswith("| do(")]
    assert len(blocks) == 12 and blocks[0] == "do(CPA-ostial)" and blocks[-1] == "do(LA-distal)"
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    assert any("on the intervened region for" in f and "of 12 interventions" in f for f in results["findings"])
    truth = (tmp_path / "run" / "report" / "table1_ground_truth.md").read_text()
    assert "| ostial | proximal | mid | distal |" in truth  # the phantom's truth follows the partition


def write_stent_folder(root: Path, sizes: dict[str, int]) -> None:
    """16 x 96 images of a vessel (label 1) with stent struts (label 2) at random places."""
    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        (root / split).mkdir(parents=True)
        for i in range(n):
            labels = np.zeros((16, 96), np.uint8)
            labels[6:10] = 1
            for _ in range(int(rng.integers(0, 4))):
                start = int(rng.integers(0, 88))
                labels[5, start : start + int(rng.integers(2, 8))] = 2
            image = np.array([-0.8, 0.3, 0.9], np.float32)[labels] + rng.normal(0, 0.05, labels.shape)
            np.savez(root / split / f"{i:03d}.npz", image=np.clip(image, -1, 1).astype(np.float32), mask=labels)
    description = {"label_map": {"0": "tissue", "1": "vessel", "2": "stent"}, "spacing_mm": 1.0}
    (root / "dataset.json").write_text(json.dumps(description))


def test_a_folder_of_another_anatomy_with_two_structures_runs_end_to_end(tmp_path):
    folder = tmp_path / "stents"
    write_stent_folder(folder, {"train": 32, "val": 4, "test": 4})
    registry = load_registry()
    config = load_config("tiny", [f"run.dir={tmp_path / 'run'}", f"data={{name: folder, path: {folder}}}"], registry)
    run_pipeline(config, registry)
    lines = table1(tmp_path / "run")
    blocks = [line.split("|")[1].strip() for line in lines[4:] if line.startswith("| do(")]
    assert blocks == [f"do({s}-{r})" for s in ("VESSEL", "STENT") for r in ("proximal", "mid", "distal")]
    assert not (tmp_path / "run" / "report" / "table1_ground_truth.md").exists()  # no truth for a folder
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "true counterfactual" not in summary.split("\n\n")[1]  # no ground-truth columns
    assert "not available" in summary
