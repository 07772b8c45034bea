"""Guidance strategies on synthetic scenes whose true areas are known exactly.

Images code each class by an intensity; ``IntensitySegmentor`` (a real, differentiable one-layer
segmentor with weights) reads it back with negligible leakage, so its soft areas equal the truth.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from causalimg.core.guidance import GuidanceInputs, GuidancePredictors
from causalimg.core.transform import VariableTransform
from causalimg.data.phantom import phantom_schema
from causalimg.errors import ConfigError
from causalimg.guidance.positional import PositionalSegmentorGuidance, PositionalSegmentorGuidanceConfig
from causalimg.guidance.regressor import RegressorGuidance, RegressorGuidanceConfig
from causalimg.guidance.segmentor import SegmentorGuidance, SegmentorGuidanceConfig
from causalimg.plugins.manager import load_registry

REGIONS = ("proximal", "mid", "distal")
SCHEMA = phantom_schema(REGIONS, with_age=False)
NUM_CLASSES = SCHEMA.num_classes
LUMEN, CALCIFIED, NONCALCIFIED = (SCHEMA.structure(s).label for s in ("la", "cpa", "ncpa"))
H, W = 8, 24
LEVELS = (-1.0, 1.0, 0.5, 0.0)  # background, lumen, calcified, non-calcified


class IntensitySegmentor(nn.Module):
    """logits_c = -sharpness * (x - level_c)^2: exact on intensity-coded images."""

    def __init__(self, sharpness: float = 200.0):
        super().__init__()
        self.levels = nn.Parameter(torch.tensor(LEVELS).reshape(1, NUM_CLASSES, 1, 1))
        self.sharpness = nn.Parameter(torch.tensor(sharpness))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.sharpness * (x - self.levels) ** 2  # (B, C, H, W)


class AreaRegressor(nn.Module):
    """A regressor that is right by construction: normalised regional areas of the segmentor."""

    def __init__(self, transform: VariableTransform, regions: torch.Tensor, pixel_area: float):
        super().__init__()
        self.segmentor, self.transform, self.pixel_area = IntensitySegmentor(), transform, pixel_area
        self.register_buffer("regions", regions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        areas = SCHEMA.measure(self.segmentor(x).softmax(1), self.regions, self.pixel_area)
        return self.transform.normalise(areas)


def num(t: torch.Tensor) -> float:
    return float(t.detach())


def thirds(height: int = H, width: int = W) -> torch.Tensor:
    regions = torch.zeros(1, 3, height, width)
    for k in range(3):
        regions[0, k, :, k * width // 3 : (k + 1) * width // 3] = 1
    return regions


def scene(calc_columns: list[int], ncpa_columns: list[int] = (), batch: int = 2) -> torch.Tensor:
    """Label map (B, H, W): lumen rows 3-4, calcium at row 1 of the given columns, NCPA at row 6."""
    labels = torch.zeros(batch, H, W, dtype=torch.long)
    labels[:, 3:5, :] = LUMEN
    labels[:, 1, list(calc_columns)] = CALCIFIED
    labels[:, 6, list(ncpa_columns)] = NONCALCIFIED
    return labels


def render(labels: torch.Tensor) -> torch.Tensor:
    return torch.tensor(LEVELS)[labels][:, None]  # (B, 1, H, W)


def truth(labels: torch.Tensor, pixel_area: float = 1.0, regions: torch.Tensor | None = None) -> torch.Tensor:
    onehot = nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
    return SCHEMA.measure(onehot, thirds() if regions is None else regions, pixel_area)  # (B, 9)


TRANSFORM = VariableTransform(SCHEMA.names, torch.zeros(9), torch.tensor([8.0] * 3 + [8.0] * 3 + [20.0] * 3))


def inputs_for(
    cf_labels: torch.Tensor,
    cf_parents: torch.Tensor,
    labels: torch.Tensor | None = None,
    parents: torch.Tensor | None = None,
    intervened: torch.Tensor | None = None,
    pixel_area: float = 1.0,
) -> GuidanceInputs:
    labels = cf_labels if labels is None else labels
    return GuidanceInputs(
        cf_image=render(cf_labels).requires_grad_(True),
        cf_parents=cf_parents,
        image=render(labels),
        parents=truth(labels, pixel_area) if parents is None else parents,
        intervened=torch.zeros_like(cf_parents, dtype=torch.bool) if intervened is None else intervened,
        regions=thirds(),
        pixel_area_mm2=pixel_area,
        transform=TRANSFORM,
        schema=SCHEMA,
    )


def all_strategies(**options):
    seg = IntensitySegmentor()
    reg = AreaRegressor(TRANSFORM, thirds(), 1.0)
    return {
        "regressor": RegressorGuidance(RegressorGuidanceConfig(**options), reg),
        "segmentor": SegmentorGuidance(SegmentorGuidanceConfig(**options), seg),
        "positional-segmentor": PositionalSegmentorGuidance(PositionalSegmentorGuidanceConfig(**options), seg),
    }


@pytest.mark.parametrize("name", ["regressor", "segmentor", "positional-segmentor"])
@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_zero_when_counterfactual_is_the_truth(name: str, loss: str) -> None:
    cf = scene([2, 3, 10, 20], ncpa_columns=[5, 17])
    terms = all_strategies(loss=loss)[name](inputs_for(cf, truth(cf), labels=scene([2])))
    assert set(terms) == {name}
    assert num(terms[name]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["regressor", "segmentor", "positional-segmentor"])
def test_gradients_reach_the_image_and_never_the_predictor(name: str) -> None:
    strategy = all_strategies()[name]
    strategy.train()
    cf = scene([2, 3])
    wanted = truth(cf)
    wanted[:, 1] += 3.0  # ask for more calcium mid
    inputs = inputs_for(cf, wanted)
    # soften the reading so the gradient is not vanishing at an exact intensity level
    inputs.cf_image = (inputs.cf_image.detach() + 0.05).requires_grad_(True)
    strategy(inputs)[name].backward()
    assert inputs.cf_image.grad is not None and inputs.cf_image.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in strategy.parameters())
    assert not any(m.training for m in strategy.children())


def test_positional_sees_a_moved_structure_that_global_areas_miss() -> None:
    factual = scene([2, 3, 4])  # calcium proximal
    moved = scene([18, 19, 20])  # the same amount, distal
    strategies = all_strategies()
    inputs = inputs_for(moved, truth(factual), labels=factual)
    assert num(strategies["segmentor"](inputs)["segmentor"]) == pytest.approx(0.0, abs=1e-6)
    positional = num(strategies["positional-segmentor"](inputs)["positional-segmentor"])
    # 3 px of calcium missing proximally and 3 px too many distally, each (3 / 8 * 2)^2
    assert positional == pytest.approx(2 * (3 / 8 * 2) ** 2, rel=1e-4)


def test_soft_labels_take_the_segmentors_factual_reading_where_nothing_was_asked() -> None:
    factual = scene([2], ncpa_columns=[12])
    cf = scene([2, 3], ncpa_columns=[12])  # one more calcium pixel proximally, as asked
    parents = truth(factual)
    parents[:, 4] += 2.0  # recorded NCPA-mid disagrees with what the segmentor reads
    cf_parents = parents.clone()
    cf_parents[:, 0] += 1.0  # do(cpa_proximal := +1)
    intervened = torch.zeros_like(parents, dtype=torch.bool)
    intervened[:, 0] = True
    inputs = inputs_for(cf, cf_parents, labels=factual, parents=parents, intervened=intervened)
    hard = all_strategies()["positional-segmentor"](inputs)["positional-segmentor"]
    soft = all_strategies(soft_labels=True)["positional-segmentor"](inputs)["positional-segmentor"]
    assert num(hard) == pytest.approx((2.0 / 8 * 2) ** 2, rel=1e-4)  # the recorded bias is penalised
    assert num(soft) == pytest.approx(0.0, abs=1e-6)
    # an intervened target is still the counterfactual parent, not the factual reading
    cf_parents[:, 0] += 2.0
    wrong = all_strategies(soft_labels=True)["positional-segmentor"](inputs)["positional-segmentor"]
    assert num(wrong) == pytest.approx((2.0 / 8 * 2) ** 2, rel=1e-4)


@pytest.mark.parametrize("name", ["regressor", "segmentor", "positional-segmentor"])
def test_loss_scale_does_not_depend_on_resolution_or_units(name: str) -> None:
    factual, cf = scene([2, 3]), scene([2, 3, 12])
    wanted = truth(factual)
    wanted[:, 1] += 2.0
    coarse = all_strategies()[name](inputs_for(cf, wanted, labels=factual))[name]

    # the same scene at twice the resolution and in cm^2 (pixel area 1/4, areas and ranges / 100)
    def up(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(2, -1).repeat_interleave(2, -2)

    cm = VariableTransform(TRANSFORM.names, TRANSFORM.low / 100, TRANSFORM.high / 100)
    fine_inputs = GuidanceInputs(
        cf_image=up(render(cf)),
        cf_parents=wanted / 100,
        image=up(render(factual)),
        parents=truth(factual) / 100,
        intervened=torch.zeros(2, 9, dtype=torch.bool),
        regions=thirds(2 * H, 2 * W),
        pixel_area_mm2=0.25 / 100,
        transform=cm,
        schema=SCHEMA,
    )
    strategy = all_strategies()[name]
    if name == "regressor":  # its regressor measures in the new grid and units
        strategy = RegressorGuidance(RegressorGuidanceConfig(), AreaRegressor(cm, thirds(2 * H, 2 * W), 0.25 / 100))
    fine = strategy(fine_inputs)[name]
    assert num(coarse) > 1e-3
    assert num(fine) == pytest.approx(num(coarse), rel=1e-4)


def test_weight_and_l1_l2() -> None:
    factual, cf = scene([2]), scene([2, 3, 4])
    inputs = inputs_for(cf, truth(factual), labels=factual)
    l1 = all_strategies(loss="l1")["positional-segmentor"](inputs)["positional-segmentor"]
    l2 = all_strategies(loss="l2", weight=3.0)["positional-segmentor"](inputs)["positional-segmentor"]
    assert num(l1) == pytest.approx(2 / 8 * 2, rel=1e-4)
    assert num(l2) == pytest.approx(3.0 * (2 / 8 * 2) ** 2, rel=1e-4)


def test_region_names_must_match_the_data() -> None:
    cf = scene([2])
    other = phantom_schema(("left", "centre", "right"), with_age=False)
    inputs = dataclasses.replace(inputs_for(cf, truth(cf)), schema=other)
    with pytest.raises(ConfigError, match="cpa_left"):
        all_strategies()["positional-segmentor"](inputs)


def test_registered_plugins_build_from_config_and_need_their_predictor() -> None:
    registry = load_registry()
    assert {"regressor", "segmentor", "positional-segmentor"} <= set(registry.names("guidance"))
    spec = registry.get("guidance", "positional-segmentor")
    config = spec.config(weight=0.5, loss="l1", soft_labels=True)
    strategy = spec.factory(config, predictors=GuidancePredictors(segmentor=IntensitySegmentor()))
    assert isinstance(strategy, PositionalSegmentorGuidance)
    with pytest.raises(ConfigError, match="needs the frozen regressor"):
        registry.get("guidance", "regressor").factory(
            RegressorGuidanceConfig(), predictors=GuidancePredictors(segmentor=IntensitySegmentor())
        )
    with pytest.raises(ValueError, match="extra"):
        spec.config(wieght=1.0)


def test_the_evaluation_segmentor_cannot_reach_training() -> None:
    """Fine-tuning gets predictors only through GuidancePredictors, which has no field for it."""
    assert {f.name for f in dataclasses.fields(GuidancePredictors)} == {"segmentor", "regressor"}
    with pytest.raises(TypeError):
        GuidancePredictors(evaluation_segmentor=IntensitySegmentor())  # type: ignore[call-arg]


def test_gradient_temperature_keeps_the_areas_and_tempers_only_the_gradient():
    from causalimg.guidance.base import class_probabilities

    logits = (torch.randn(2, NUM_CLASSES, 4, 6) * 8).requires_grad_(True)
    weights = torch.randn(2, NUM_CLASSES, 4, 6)
    plain = class_probabilities(logits, 1.0)
    tempered = class_probabilities(logits, 4.0)
    torch.testing.assert_close(tempered, plain)  # the measured areas do not change
    (grad_tempered,) = torch.autograd.grad((tempered * weights).sum(), logits)
    (grad_soft,) = torch.autograd.grad(((logits / 4.0).softmax(1) * weights).sum(), logits)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    torch.testing.assert_close(grad_tempered, grad_soft)
    assert not torch.allclose(grad_tempered, grad_plain)


@pytest.mark.parametrize("name", ["segmentor", "positional-segmentor"])
def test_gradient_temperature_reaches_pixels_a_confident_segmentor_ignores(name: str) -> None:
    """Background pixels (p(calcified) ~ 0) get a gradient towards more calcium only when tempered."""
    cf = scene([2, 3])
    wanted = truth(cf)
    wanted[:, 1] += 3.0  # ask for more calcium mid
    background = render(cf) == LEVELS[0]
    grads = {}
    for temperature in (1.0, 50.0):
        seg = IntensitySegmentor()
        strategy = {
            "segmentor": SegmentorGuidance(SegmentorGuidanceConfig(gradient_temperature=temperature), seg),
            "positional-segmentor": PositionalSegmentorGuidance(
                PositionalSegmentorGuidanceConfig(gradient_temperature=temperature), seg
            ),
        }[name]
        inputs = inputs_for(cf, wanted)
        strategy(inputs)[name].backward()
        grads[temperature] = inputs.cf_image.grad
    assert grads[1.0][background].abs().max() < 1e-20
    assert grads[50.0][background].abs().max() > 1e-6


@pytest.mark.parametrize("name", ["regressor", "segmentor", "positional-segmentor"])
def test_untouched_loss_applies_only_where_the_intervention_does_not_reach(name: str) -> None:
    cf = scene([2, 3, 10, 11])
    wanted = truth(cf)
    wanted[:, 1] += 2.0  # calcium mid: the intervened variable
    wanted[:, 7] += 1.0  # lumen mid drifted a little: untouched
    intervened = torch.zeros_like(wanted, dtype=torch.bool)
    intervened[:, 1] = True
    inputs = inputs_for(cf, wanted, intervened=intervened)
    same = {kind: num(all_strategies(loss=kind)[name](inputs)[name]) for kind in ("l1", "l2")}
    mixed = num(all_strategies(loss="l2", untouched_loss="l1")[name](inputs)[name])
    assert num(all_strategies(loss="l2", untouched_loss="l2")[name](inputs)[name]) == pytest.approx(same["l2"])
    assert mixed != pytest.approx(same["l2"]) and mixed != pytest.approx(same["l1"])
    if name == "positional-segmentor":  # two errors of 2/8*2 = 0.5 (touched) and 1/20*2 = 0.1 (untouched)
        assert mixed == pytest.approx(0.5**2 + 0.1, rel=1e-4)
