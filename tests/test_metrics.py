"""Counterfactual metrics on tiny synthetic worlds whose answers are known."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from causalimg.core.schema import Variable
from causalimg.core.transform import VariableTransform
from causalimg.data.phantom import phantom_schema
from causalimg.metrics.base import (
    EvalContext,
    EvalInfo,
    collect_rows,
    intervention_targets,
    mean_ci,
    per_image_errors,
    summarise,
    t_quantile_975,
)
from causalimg.metrics.composition import Composition
from causalimg.metrics.effectiveness import Effectiveness
from causalimg.metrics.ground_truth import GroundTruth
from causalimg.metrics.realism import Realism, frechet_distance
from causalimg.metrics.reversibility import Reversibility
from causalimg.report.paired import paired_differences, paired_findings, paired_table

REGIONS = ("proximal", "mid", "distal")
SCHEMA = phantom_schema(REGIONS, with_age=False)
NAMES = SCHEMA.area_names
NUM_CLASSES = SCHEMA.num_classes
H, W = 8, 24  # three 8 x 8 regions, 1 mm^2 pixels
LEVELS = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])  # intensity of each class label


def region_masks() -> torch.Tensor:
    masks = torch.zeros(1, 3, H, W)
    for k in range(3):
        masks[0, k, :, 8 * k : 8 * (k + 1)] = 1
    return masks


def render(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy world: each region is filled in raster order with round(area) pixels per structure.

    parents (B, 9) mm^2 -> image (B, 1, H, W) with one intensity level per class, masks (B, C, H, W).
    """
    labels = torch.zeros(parents.shape[0], H, W, dtype=torch.long)
    for b in range(parents.shape[0]):
        for k in range(3):
            flat = torch.zeros(64, dtype=torch.long)
            start = 0
            for s, structure in enumerate(SCHEMA.structures):
                count = round(float(parents[b, s * 3 + k]))
                flat[start : start + count] = structure.label
                start += count
            labels[b, :, 8 * k : 8 * (k + 1)] = flat.reshape(8, 8)
    masks = torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
    return LEVELS[labels].unsqueeze(1), masks


def segment(images: torch.Tensor) -> torch.Tensor:
    """An exact segmentor of the toy world: the nearest intensity level, one-hot."""
    labels = (images.squeeze(1).unsqueeze(-1) - LEVELS).abs().argmin(-1)
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()


def features(images: torch.Tensor) -> torch.Tensor:
    return segment(images).mean((2, 3))  # (B, C) class fractions


def apply_do(pa: torch.Tensor, do) -> torch.Tensor:
    out = pa.clone()
    for name, value in do.items():
        out[:, NAMES.index(name)] = value
    return out


class Perfect:
    """The true counterfactual of the toy world."""

    def counterfactual(self, x, pa, do):
        pa_cf = apply_do(pa, do)
        return render(pa_cf)[0], pa_cf


class Identity:
    """Ignores the intervention: x~ = x."""

    def counterfactual(self, x, pa, do):
        return x.clone(), apply_do(pa, do)


class Leaky:
    """Moves every region of the intervened structure to the target (positional leakage)."""

    def counterfactual(self, x, pa, do):
        pa_cf = apply_do(pa, do)
        shown = pa_cf.clone()
        for name, value in do.items():
            s = NAMES.index(name) // 3
            shown[:, 3 * s : 3 * s + 3] = value[:, None]
        return render(shown)[0], pa_cf


class Drift:
    """Adds a constant to the image on every call."""

    def __init__(self, step: float):
        self.step = step

    def counterfactual(self, x, pa, do):
        return x + self.step, apply_do(pa, do)


TRANSFORM = VariableTransform(
    NAMES, torch.tensor([0.0, 0, 0, 0, 0, 0, 8, 8, 8]), torch.tensor([8.0, 8, 8, 12, 12, 12, 30, 30, 30])
)
INFO = EvalInfo(SCHEMA)


def batches(n: int = 12, batch_size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, len(NAMES), generator=g)
    parents = (TRANSFORM.low + u * (TRANSFORM.high - TRANSFORM.low)).round()
    image, _ = render(parents)
    return [
        {
            "image": image[i : i + batch_size],
            "parents": parents[i : i + batch_size],
            "index": torch.arange(i, min(i + batch_size, n)),
        }
        for i in range(0, n, batch_size)
    ]


def toy_true_counterfactual(batch, do):
    pa_cf = apply_do(batch["parents"], do)
    image, masks = render(pa_cf)
    return image, masks, pa_cf


def make_context(batch, truth=True):
    regions = region_masks().expand(len(batch["index"]), -1, -1, -1)  # per-image regions, as data sets give
    return EvalContext(
        INFO, TRANSFORM, regions, 1.0, segment, features, toy_true_counterfactual if truth else None, seed=3
    )


def evaluate(metrics, model, data, context, info, gatherer=None):
    """Rows of every batch, gathered, then every metric's summary: what the evaluate stage does."""
    _, rows = collect_rows(metrics, model, data, context, gatherer)
    return summarise(metrics, rows, info)


def run(model, metrics, **kw):
    return evaluate(metrics, model, batches(**kw), make_context, INFO)


def test_perfect_generator_has_no_ground_truth_error_and_only_rounding_effectiveness_error():
    out = run(Perfect(), {"eff": Effectiveness(), "gt": GroundTruth()})
    eff, gt = out["eff"], out["gt"]
    assert eff["intervened"] <= 0.5 and eff["off_target"] <= 0.5  # targets are rounded to whole pixels
    assert gt["available"] and gt["intervened"] == 0 and gt["off_target_all"] == 0
    assert gt["image_mean"]["mae_in"] == 0 and gt["image_mean"]["mae_out"] == 0
    assert gt["image_mean"]["psnr_in"] > 100
    assert eff["cells"]["cpa_mid"]["cpa_mid"]["n"] == 12


def test_identity_generator_fails_effectiveness_but_composes_and_reverses_perfectly():
    out = run(
        Identity(), {"eff": Effectiveness(), "comp": Composition((1, 10)), "rev": Reversibility(), "gt": GroundTruth()}
    )
    assert out["eff"]["intervened"] > 2.0  # the image ignores the target
    assert out["eff"]["off_target"] <= 0.5
    assert out["comp"]["l1_1"]["mean"] == 0 and out["comp"]["l1_10"]["mean"] == 0
    assert out["rev"]["l1"]["mean"] == 0
    assert out["gt"]["image_mean"]["mae_in"] > 0 and out["gt"]["image_mean"]["mae_out"] == 0
    assert out["gt"]["intervened"] > 2.0 and out["gt"]["segmentor_floor"]["intervened"] == 0  # an exact segmentor


def test_leakage_shows_as_off_target_error_only():
    out = run(Leaky(), {"eff": Effectiveness()})["eff"]
    assert out["intervened"] <= 0.5
    assert out["off_target"] > 2.0
    # a leaky LA intervention moves LA elsewhere, not the plaque variables
    row = out["cells"]["la_mid"]
    assert row["la_proximal"]["mean"] > 2.0 and row["cpa_proximal"]["mean"] <= 0.5


def test_composition_counts_repeated_drift_in_0_255_units():
    out = run(Drift(0.01), {"comp": Composition((1, 10))})["comp"]
    assert out["l1_1"]["mean"] == pytest.approx(1.275, rel=1e-4)
    assert out["l1_10"]["mean"] == pytest.approx(12.75, rel=1e-4)


def test_realism_is_zero_for_identity_and_positive_for_a_shifted_distribution():
    same = run(Identity(), {"r": Realism()}, n=16)["r"]
    assert same["fd"] < 1e-4  # the same features, repeated once per intervention
    assert 1e-4 < same["fd_real_halves"] < 0.01
    blank = run(Drift(-2.0), {"r": Realism()}, n=16)["r"]  # every pixel becomes background
    assert blank["fd"] > 100 * same["fd_real_halves"]


def test_frechet_distance_of_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0, 0], dtype=torch.float64)
    # |mu|^2 = 1; trace terms: 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_ground_truth_without_truth_says_so():
    out = evaluate({"gt": GroundTruth()}, Perfect(), batches(), lambda b: make_context(b, truth=False), INFO)
    assert out["gt"] == {"available": False, "reason": "the data set has no true counterfactuals"}


def test_targets_are_uniform_in_range_and_do_not_depend_on_batching():
    index = torch.arange(2000)
    targets = intervention_targets(index, TRANSFORM, seed=5, stream=1)
    assert ((targets >= TRANSFORM.low) & (targets <= TRANSFORM.high)).all()
    fraction = (targets - TRANSFORM.low) / (TRANSFORM.high - TRANSFORM.low)
    assert fraction.mean(0).sub(0.5).abs().max() < 0.03
    assert torch.equal(intervention_targets(index[7:9], TRANSFORM, 5, 1), targets[7:9])
    assert not torch.equal(intervention_targets(index[:4], TRANSFORM, 6, 1), targets[:4])


def test_results_do_not_depend_on_batch_size():
    one = run(Leaky(), {"eff": Effectiveness()}, batch_size=12)["eff"]
    many = run(Leaky(), {"eff": Effectiveness()}, batch_size=5)["eff"]
    assert one["cells"] == many["cells"]


def test_gatherer_sees_every_column_of_every_batch():
    class Recording:
        def __init__(self):
            self.shapes = []

        def gather_for_metrics(self, value):
            self.shapes.append(tuple(value.shape))
            return value

    gatherer = Recording()
    evaluate({"eff": Effectiveness()}, Perfect(), batches(n=8), make_context, INFO, gatherer)
    assert gatherer.shapes == [(4,), (4, 9, 9), (4, 9), (4,), (4, 9, 9), (4, 9)]  # index, then the rows


def test_mean_ci_matches_a_hand_computed_t_interval():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = mean_ci(values)
    assert out["mean"] == 3.0 and out["n"] == 5
    assert out["ci95"] == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert t_quantile_975(10) == pytest.approx(2.228139, abs=5e-4)
    assert t_quantile_975(30) == pytest.approx(2.042272, abs=5e-4)
    assert t_quantile_975(6) == pytest.approx(2.446912, abs=5e-4)
    assert math.isnan(mean_ci(torch.tensor([1.0]))["ci95"])


def test_unreachable_true_counterfactuals_are_counted_and_left_out():
    def partial_truth(batch, do):
        image, masks, parents = toy_true_counterfactual(batch, do)
        (value,) = do.values()
        missing = value > 20  # pretend these targets do not fit the true geometry
        image[missing], masks[missing], parents[missing] = torch.nan, torch.nan, torch.nan
        return image, masks, parents

    def context(batch):
        return EvalContext(INFO, TRANSFORM, region_masks(), 1.0, segment, features, partial_truth, seed=3)

    out = evaluate({"gt": GroundTruth()}, Perfect(), batches(), context, INFO)["gt"]
    assert out["unreachable"]["cpa_mid"] == 0 and out["unreachable"]["la_mid"] > 0
    assert out["intervened"] == 0 and out["image_mean"]["mae_in"] == 0
    n_la = out["cells"]["la_mid"]["la_mid"]["n"]
    assert n_la == 12 - out["unreachable"]["la_mid"]


def test_parents_beyond_the_area_variables_are_carried_but_not_scored():
    """A data set with an extra root (the phantom's optional age) puts it among the parents."""
    names = ("age", *NAMES)
    transform = VariableTransform(
        names, torch.cat([torch.tensor([40.0]), TRANSFORM.low]), torch.cat([torch.tensor([80.0]), TRANSFORM.high])
    )
    info = EvalInfo(dataclasses.replace(SCHEMA, extra=(Variable("age", unit="years"),)))

    class PerfectWithAge:
        def counterfactual(self, x, pa, do):
            pa_cf = pa.clone()
            for name, value in do.items():
                pa_cf[:, names.index(name)] = value
            return render(pa_cf[:, 1:])[0], pa_cf

    with_age = [
        {**b, "parents": torch.cat([torch.full((len(b["index"]), 1), 60.0), b["parents"]], 1)} for b in batches()
    ]

    def context(batch):
        return EvalContext(info, transform, region_masks(), 1.0, segment, features, None, seed=3)

    out = evaluate({"eff": Effectiveness(), "rev": Reversibility()}, PerfectWithAge(), with_age, context, info)
    assert set(out["eff"]["cells"]) == set(NAMES) and out["eff"]["intervened"] <= 0.5
    assert out["rev"]["l1"]["mean"] <= 1.0


def flat_rows(model, n: int = 12, order=None) -> dict[str, torch.Tensor]:
    """A strategy's rows as the evaluate stage stores them; ``order`` permutes the images."""
    data = batches(n=n)
    if order is not None:
        data = [{k: v[order] for k, v in merge(data).items()}]
    index, rows = collect_rows(
        {"effectiveness": Effectiveness(), "ground-truth": GroundTruth()}, model, data, make_context
    )
    return {"index": index, **{f"{m}/{c}": v for m, columns in rows.items() for c, v in columns.items()}}


MEASURED_BY = {"effectiveness/abs_error": "evaluation segmentor", "ground-truth/area_error": "true counterfactual"}


def merge(data):
    return {k: torch.cat([b[k] for b in data]) for k in data[0]}


def test_collect_rows_keeps_image_indices_in_the_order_of_the_rows():
    index, rows = collect_rows({"eff": Effectiveness()}, Perfect(), batches(n=10, batch_size=4), make_context)
    assert torch.equal(index, torch.arange(10))
    assert rows["eff"]["abs_error"].shape == (10, 9, 9)


def test_per_image_errors_average_to_the_headline_numbers():
    out = run(Leaky(), {"eff": Effectiveness()})["eff"]
    _, rows = collect_rows({"eff": Effectiveness()}, Leaky(), batches(), make_context)
    per_image = per_image_errors(rows["eff"]["abs_error"], SCHEMA)
    assert float(per_image["intervened"].mean()) == pytest.approx(out["intervened"], abs=1e-5)
    assert float(per_image["off_target"].mean()) == pytest.approx(out["off_target"], abs=1e-5)


def test_paired_differences_tell_a_leaky_generator_from_a_perfect_one_whatever_the_image_order():
    perfect, leaky = (
        flat_rows(Perfect()),
        flat_rows(Leaky(), order=torch.randperm(12, generator=torch.Generator().manual_seed(1))),
    )
    differences = paired_differences({"perfect": perfect, "leaky": leaky}, SCHEMA, MEASURED_BY)
    assert {d["measured_by"] for d in differences} == {"evaluation segmentor", "true counterfactual"}
    by_segmentor = next(d for d in differences if d["measured_by"] == "evaluation segmentor")
    assert (by_segmentor["later"], by_segmentor["earlier"]) == ("leaky", "perfect")
    assert by_segmentor["off_target"]["mean"] > by_segmentor["off_target"]["ci95"] > 0  # leaky leaks, clearly
    assert by_segmentor["intervened"]["mean"] == pytest.approx(0.0, abs=1e-6)  # both hit the intervened region
    assert by_segmentor["off_target"]["n"] == 12
    table = paired_table(differences, SCHEMA).markdown()
    assert "leaky - perfect" in table and "**" in table
    perfect_first = paired_findings(differences, "perfect", "leaky")[0]
    assert "off-target -" in perfect_first and "(lower)" in perfect_first
    assert "intervened +0.00" in perfect_first or "intervened -0.00" in perfect_first
    assert "no clear difference" in perfect_first


def test_paired_differences_pair_only_the_images_both_runs_evaluated():
    full, part = flat_rows(Leaky(), n=12), flat_rows(Leaky(), n=8)
    differences = paired_differences({"a": full, "b": part}, SCHEMA, MEASURED_BY)
    assert differences[0]["off_target"]["n"] == 8
    assert differences[0]["off_target"]["mean"] == pytest.approx(0.0, abs=1e-6)
