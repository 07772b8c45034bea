"""Using a trained model: the Python API, the counterfactual / augment / export-model commands and
the explorer page, on one tiny run folder made once for the module."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from causalimg import run
from causalimg.api.bundle import export_model
from causalimg.api.model import GIVEN, MASKS, SEGMENTOR, CounterfactualModel
from causalimg.builder import Builder
from causalimg.cli import main
from causalimg.config.loader import load_config
from causalimg.errors import CausalImgError, InterventionError
from causalimg.plugins.manager import load_registry
from causalimg.testing import check_data_source

STRATEGY = "positional-segmentor"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread) -> Path:
    """A tiny run with one fine-tuned strategy (every stage the API reads; numbers mean nothing)."""
    root = tmp_path_factory.mktemp("api") / "run"
    strategies = f"finetune.strategies={{{STRATEGY}: [{{name: {STRATEGY}}}]}}"
    assert run.main(["--config", "tiny", "--set", f"run.dir={root}", "--set", strategies]) == 0
    return root


@pytest.fixture(scope="module")
def model(run_dir) -> CounterfactualModel:
    return CounterfactualModel.from_pretrained(run_dir)


@pytest.fixture(scope="module")
def test_items(model):
    data = model.data_source().split("test")
    items = [data[i] for i in range(4)]
    return torch.stack([it["image"] for it in items]), torch.stack([it["parents"] for it in items]), items


def test_counterfactual_changes_the_asked_variable_by_the_asked_amount(model, test_items):
    x, pa, _ = test_items
    result = model.counterfactual(x, {"cpa_mid": "+2"}, parents=pa)
    i = model.names.index("cpa_mid")
    assert result.images.shape == x.shape and torch.isfinite(result.images).all()
    assert result.images.abs().max() <= 1
    torch.testing.assert_close(result.parents[:, i], pa[:, i] + 2)
    torch.testing.assert_close(result.targets["cpa_mid"], pa[:, i] + 2)
    # the area variables are roots: nothing else moves
    others = [j for j in range(len(model.names)) if j != i]
    torch.testing.assert_close(result.parents[:, others], pa[:, others])
    assert result.measured.shape == (4, len(model.schema.area_names))
    assert result.masks.shape == (4, model.schema.num_classes, *model.image_shape)
    assert set(result.parents_source.values()) == {GIVEN} and result.source == GIVEN
    # the measured areas are the evaluation segmentor's soft areas of x~
    again = model.measure(result.images, result.regions)
    torch.testing.assert_close(result.measured, again, atol=1e-4, rtol=1e-4)


def test_factual_parents_from_masks_or_the_guidance_segmentor_say_so(model, test_items):
    x, _, items = test_items
    labels = torch.stack([it["labels"] for it in items])  # (B, H, W) class indices
    from_masks = model.counterfactual(x, {"cpa_mid": 1.0}, masks=labels, clamp=True)
    assert set(from_masks.parents_source.values()) == {MASKS}
    measured = model.schema.measure(
        torch.nn.functional.one_hot(labels.long(), model.schema.num_classes).permute(0, 3, 1, 2).float(),
        from_masks.regions,
        model.spacing_mm**2,
    )
    area_columns = [model.names.index(n) for n in model.schema.area_names]
    torch.testing.assert_close(from_masks.factual_parents[:, area_columns], measured)
    read = model.counterfactual(x, {"cpa_mid": 1.0}, clamp=True)
    assert set(read.parents_source.values()) == {SEGMENTOR}


def test_out_of_support_is_an_error_or_a_reported_clamp(model, test_items):
    x, pa, _ = test_items
    with pytest.raises(InterventionError, match="cpa_mid.*outside the observed support"):
        model.counterfactual(x, {"cpa_mid": 1e6}, parents=pa)
    clamped = model.counterfactual(x, {"cpa_mid": 1e6}, parents=pa, clamp=True)
    high = float(model.transform.high[model.names.index("cpa_mid")])
    assert clamped.clamped["cpa_mid"].all()
    torch.testing.assert_close(clamped.targets["cpa_mid"], torch.full((4,), high))
    with pytest.raises(CausalImgError, match="nope"):
        model.counterfactual(x, {"nope": 1.0}, parents=pa)
    with pytest.raises(CausalImgError, match=r"\[-1, 1\]"):
        model.counterfactual(x * 10, {"cpa_mid": "+1"}, parents=pa)


def test_same_seed_same_counterfactual_and_an_exported_model_is_bit_identical(model, run_dir, tmp_path, test_items):
    x, pa, _ = test_items
    first = model.counterfactual(x, {"cpa_mid": "+1", "la_mid": "-1"}, parents=pa, seed=3)
    again = model.counterfactual(x, {"cpa_mid": "+1", "la_mid": "-1"}, parents=pa, seed=3)
    assert torch.equal(first.images, again.images)
    exported = export_model(run_dir, None, tmp_path / "model")
    assert (exported / "model.json").is_file()
    loaded = CounterfactualModel.from_pretrained(exported)
    assert loaded.strategy == STRATEGY
    moved = tmp_path / "moved"
    shutil.move(str(exported), moved)  # an exported folder does not depend on the run or on its place
    loaded = CounterfactualModel.from_pretrained(moved)
    result = loaded.counterfactual(x, {"cpa_mid": "+1", "la_mid": "-1"}, parents=pa, seed=3)
    assert torch.equal(result.images, first.images) and torch.equal(result.measured, first.measured)


def test_a_tampered_export_is_refused(run_dir, tmp_path):
    exported = export_model(run_dir, None, tmp_path / "model")
    weights = next(p for p in exported.iterdir() if p.name.endswith(".safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CausalImgError, match=weights.name):
        CounterfactualModel.from_pretrained(exported)


def test_counterfactual_command_writes_images_differences_and_areas(run_dir, tmp_path, capsys):
    out = tmp_path / "cf"
    rc = main(["counterfactual", str(run_dir), "--split", "test", "-n", "3", "--do", "cpa_mid=+1", "--out", str(out)])
    assert rc == 0
    assert len(list((out / "images").iterdir())) == 3
    assert len(list((out / "differences").glob("*.png"))) == 3
    assert (out / "contact_sheet.png").stat().st_size > 0
    areas = json.loads((out / "areas.json").read_text())
    assert "cpa_mid" in json.dumps(areas)
    assert (out / "areas.csv").read_text().count("\n") >= 3
    assert "wrote 3 counterfactuals" in capsys.readouterr().out


def test_counterfactual_command_on_files_writes_the_same_format(run_dir, tmp_path):
    images = tmp_path / "in"
    main(["counterfactual", str(run_dir), "--split", "test", "-n", "2", "--do", "cpa_mid=+1", "--out", str(images)])
    inputs = sorted((images / "images").iterdir())
    out = tmp_path / "out"
    # parents read by the tiny run's untrained segmentor may lie outside the support: clamp
    rc = main(
        ["counterfactual", str(run_dir), "--input", str(inputs[0]), "--do", "cpa_mid=+1", "--clamp", "--out", str(out)]
    )
    assert rc == 0
    written = list((out / "images").iterdir())
    assert [p.suffix for p in written] == [inputs[0].suffix]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--do", "nope=+1"], "nope"),
        (["--do", "cpa_mid=banana"], "banana"),
        (["--do", "cpa_mid=+1", "--input", "/no/such/file.npz"], "/no/such/file.npz"),
    ],
)
def test_counterfactual_command_user_errors_exit_2_without_traceback(run_dir, tmp_path, capsys, args, message):
    source = [] if "--input" in args else ["--split", "test"]
    rc = main(["counterfactual", str(run_dir), *source, *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_augment_writes_a_folder_data_set_that_the_folder_plugin_reads_and_resumes(run_dir, tmp_path):
    out = tmp_path / "aug"
    args = ["augment", str(run_dir), "--split", "test", "--interventions", "cpa_mid=+1", "--out", str(out)]
    assert main([*args, "--interventions", "la_mid=-1", "--out-of-support", "clamp"]) == 0
    files = sorted((out / "test").glob("*.npz"))
    assert len(files) == 2 * 4  # every image under every intervention
    provenance = (out / "provenance-test.csv").read_text().splitlines()
    assert len(provenance) == 1 + 8 and "cpa_mid" in provenance[1]
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    assert main([*args, "--interventions", "la_mid=-1", "--out-of-support", "clamp"]) == 0  # resumed: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in files} == stamps
    registry = load_registry()
    config = load_config(
        "tiny", [f"run.dir={tmp_path / 'downstream'}", f"data={{name: folder, path: {out}}}"], registry
    )
    source = Builder(config, registry).data_source(tmp_path / "cache")
    check_data_source(source, split="test")
    # a different spec into the same folder is refused rather than mixed in
    assert main([*args, "--interventions", "la_mid=-2", "--out-of-support", "clamp"]) == 2


def test_explorer_page_moves_a_slider_and_the_image_and_area_change(model, run_dir):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs chromium (.ci/run installs it: apt-get install -y chromium)")
    from causalimg.explore.server import Explorer, run_images, serve

    server = serve(Explorer(model, run_images(model, 2)), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_selector("#status[data-state=ready]", timeout=60_000)
            before_image = page.get_attribute("#counterfactual", "src")
            before_areas = page.inner_text("#areas")
            slider = page.locator("#sliders input[type=range]").first
            slider.evaluate("s => { s.value = s.max; s.dispatchEvent(new Event('input')); }")
            page.wait_for_function(
                "src => document.querySelector('#counterfactual').src !== src", arg=before_image, timeout=60_000
            )
            page.wait_for_selector("#status[data-state=ready]", timeout=60_000)
            assert page.get_attribute("#counterfactual", "src") != before_image
            assert page.inner_text("#areas") != before_areas
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


def test_api_is_importable_from_the_package_root():
    import causalimg

    assert causalimg.CounterfactualModel is CounterfactualModel


def test_the_documented_examples_run(run_dir, capsys):
    """docs/use.md's Python blocks, in order, against the tiny run instead of runs/quickstart."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "use.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(block.replace("runs/quickstart", str(run_dir)), namespace)
    assert namespace["more"].images.shape == namespace["less"].images.shape == namespace["images"].shape
    assert "tensor" in capsys.readouterr().out
