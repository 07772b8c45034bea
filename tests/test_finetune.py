"""Counterfactual fine-tuning with a tiny HVAE and spline flows on intensity-coded scenes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from causalimg.config.sections import TrainConfig
from causalimg.core.guidance import GuidancePredictors
from causalimg.core.regions import variable_areas
from causalimg.core.scm import DSCM, SCM
from causalimg.core.transform import VariableTransform
from causalimg.core.variables import CALCIFIED, LUMEN, NUM_CLASSES, variable_names
from causalimg.errors import ConfigError, DataError
from causalimg.guidance.positional import PositionalSegmentorGuidanceConfig
from causalimg.guidance.regressor import RegressorGuidanceConfig
from causalimg.mechanisms.flows import SplineFlow
from causalimg.mechanisms.hvae import HVAE, HVAEConfig
from causalimg.plugins.manager import load_registry
from causalimg.predictors.regressor import RegressorConfig, build_regressor
from causalimg.predictors.unet import SegmentorConfig, UNet
from causalimg.training.accelerator import make_accelerator
from causalimg.training.checkpoint import list_checkpoints, load_tensors
from causalimg.training.finetune import (
    CounterfactualFineTuning,
    LagrangeMultiplier,
    build_strategies,
    finetune_dscm,
    measure_nelbo,
    select_trainable,
)

REGIONS = ("proximal", "mid", "distal")
H, W = 16, 48
LEVELS = torch.tensor([-1.0, 1.0, 0.5, 0.0])


def thirds() -> torch.Tensor:
    regions = torch.zeros(3, H, W)
    for k in range(3):
        regions[k, :, k * W // 3 : (k + 1) * W // 3] = 1
    return regions


class Scenes(Dataset):
    """Lumen band plus a calcium run at a random place; parents are the true regional areas."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.zeros(n, H, W, dtype=torch.long)
        labels[:, 7:10] = LUMEN
        for i in range(n):
            start, length = (
                int(torch.randint(0, W - 10, (1,), generator=g)),
                int(torch.randint(1, 10, (1,), generator=g)),
            )
            labels[i, 5:7, start : start + length] = CALCIFIED
        onehot = F.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
        self.images = LEVELS[labels][:, None] + 0.02 * torch.randn(n, 1, H, W, generator=g)
        self.parents = variable_areas(onehot, thirds()[None], 0.25)  # (n, 9) mm^2
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "parents": self.parents[i], "regions": thirds(), "labels": self.labels[i]}


DATA = Scenes()
TRANSFORM = VariableTransform.fit(variable_names(REGIONS), DATA.parents)


def tiny_dscm(seed: int = 0, extra_root: str | None = None) -> DSCM:
    """A tiny HVAE and one spline flow per variable (all roots), optionally with a non-area root."""
    torch.manual_seed(seed)
    transform = TRANSFORM
    if extra_root is not None:
        transform = VariableTransform((*TRANSFORM.names, extra_root), torch.cat([TRANSFORM.low, torch.zeros(1)]),
                                      torch.cat([TRANSFORM.high, torch.ones(1)]))  # fmt: skip
    names = transform.names
    hvae = HVAE.from_config(
        HVAEConfig(preset=None, widths=(8, 8, 8, 16, 16, 16), enc_blocks=(1,) * 6, dec_blocks=(1,) * 6,
                   bottleneck=0.5, z_dim=4, embed_dim=16, dropout=0.0),
        image_shape=(H, W), num_parents=len(names),
    )  # fmt: skip
    flows = {v: SplineFlow(0, transforms=1, hidden=(8,)) for v in names}
    return DSCM(SCM({v: [] for v in names}), flows, hvae, transform)


def predictors() -> GuidancePredictors:
    torch.manual_seed(1)
    regressor = build_regressor(RegressorConfig(arch="resnet10t"), len(TRANSFORM.names))  # has BatchNorm
    return GuidancePredictors(segmentor=UNet(SegmentorConfig(widths=(8, 16))), regressor=regressor)


def cft_for(dscm: DSCM, terms, preds: GuidancePredictors, **options) -> CounterfactualFineTuning:
    strategies = build_strategies(terms, load_registry(), preds)
    return CounterfactualFineTuning(
        dscm, strategies, region_names=REGIONS, pixel_area_mm2=0.25, eps=options.pop("eps", 0.0), **options
    )


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    items = [DATA[i] for i in range(n)]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def test_multiplier_rises_while_nelbo_exceeds_eps_and_never_goes_negative() -> None:
    lam = LagrangeMultiplier(lr=0.5, damping=10.0)
    values = []
    for slack in (-1.0, -1.0, 0.2, 5.0, 5.0, float("nan")):  # slack = eps - nelbo
        lam.record(torch.tensor(slack))
        assert float(lam.value) == (values[-1] if values else 0.0)  # applied before the next batch
        lam.ascend()
        values.append(float(lam.value))
    assert values == pytest.approx([0.5, 1.0, 0.9, 0.0, 0.0, 0.0])
    lam.ascend()  # nothing recorded: no change
    assert float(lam.value) == 0.0
    restored = LagrangeMultiplier(lr=0.5, damping=10.0)
    lam.value.fill_(2.5)
    restored.load_state_dict(lam.state_dict())
    assert float(restored.value) == 2.5


def test_damped_penalty_has_the_documented_gradient() -> None:
    lam = LagrangeMultiplier(lr=0.1, damping=10.0)
    lam.value.fill_(3.0)
    nelbo = torch.tensor(2.5, requires_grad=True)
    slack = 2.0 - nelbo  # eps = 2, the constraint is violated by 0.5
    penalty = lam.penalty(slack)
    penalty.backward()
    assert float(penalty.detach()) == pytest.approx(-(3.0 - 10.0 * -0.5) * -0.5)
    assert float(nelbo.grad) == pytest.approx(3.0 - 10.0 * -0.5)  # pushes the nelbo down


def test_step_draws_in_range_targets_on_area_variables_only() -> None:
    dscm = tiny_dscm(extra_root="age")
    names, transform = dscm.transform.names, dscm.transform
    cft = CounterfactualFineTuning(
        dscm, [], region_names=REGIONS, pixel_area_mm2=0.25, eps=0.0, interventions_per_step=2
    )
    torch.manual_seed(0)
    for _ in range(20):
        do, intervened = cft.draw_intervention(torch.zeros(5, len(names)))
        assert len(do) == 2 and "age" not in do
        assert intervened.sum(1).tolist() == [2] * 5 and not intervened[:, -1].any()
        for name, target in do.items():
            i = names.index(name)
            assert target.shape == (5,) and bool(((target >= transform.low[i]) & (target <= transform.high[i])).all())
    with pytest.raises(ConfigError, match="interventions_per_step=10 exceeds the 9"):
        CounterfactualFineTuning(
            dscm, [], region_names=REGIONS, pixel_area_mm2=0.25, eps=0.0, interventions_per_step=10
        )


def test_fixed_weight_objective_and_reported_terms() -> None:
    dscm, preds = tiny_dscm(), predictors()
    terms = [PositionalSegmentorGuidanceConfig(), RegressorGuidanceConfig(weight=0.1)]
    cft = cft_for(dscm, terms, preds, constraint="fixed", nelbo_weight=2.0)
    out = cft(batch())
    assert set(out) >= {"loss", "guidance", "nelbo", "lambda", "guidance/positional-segmentor", "guidance/regressor"}
    expected = out["guidance/positional-segmentor"] + out["guidance/regressor"] + 2.0 * out["nelbo"]
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    without_regions = {k: v for k, v in batch().items() if k != "regions"}
    with pytest.raises(DataError, match="region masks"):
        cft(without_regions)
    cft.fixed_regions = thirds()[None]
    assert float(cft(without_regions)["loss"].detach()) > 0


def test_decoder_only_leaves_the_encoder_and_flows_out() -> None:
    dscm = tiny_dscm()
    chosen = {id(p) for p in select_trainable(dscm, "decoder")}
    assert not chosen & {id(p) for p in dscm.image.encoder.parameters()}
    assert not chosen & {id(p) for p in dscm.attributes.parameters()}
    assert {id(p) for p in dscm.image.decoder.parameters()} <= chosen
    assert {id(p) for p in select_trainable(dscm, "all")} == {id(p) for p in dscm.image.parameters()}

    class NoEncoder(nn.Module):
        pass

    dscm.image = NoEncoder()
    with pytest.raises(ConfigError, match="no.*encoder|has none"):
        select_trainable(dscm, "decoder")


def test_finetuning_moves_only_the_image_mechanism_and_keeps_predictors_bit_identical(tmp_path: Path) -> None:
    dscm, preds = tiny_dscm(), predictors()
    frozen_before = {k: v.clone() for m in (preds.segmentor, preds.regressor) for k, v in m.state_dict().items()}
    eps = measure_nelbo(dscm, [batch(8)])
    cft = cft_for(
        dscm,
        [PositionalSegmentorGuidanceConfig(), RegressorGuidanceConfig(weight=0.1)],
        preds,
        eps=eps - 1.0,
        lagrange_lr=0.1,
        trainable="decoder",
    )  # eps below the nelbo: lambda must rise
    flows_before = {k: v.clone() for k, v in dscm.attributes.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in dscm.image.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in dscm.image.decoder.state_dict().items()}
    config = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, ema_decay=0.0, checkpoint_every=3)
    result = finetune_dscm(cft, DATA, config, tmp_path, make_accelerator(config, tmp_path), seed=0)

    frozen_after = {k: v for m in (preds.segmentor, preds.regressor) for k, v in m.state_dict().items()}
    assert all(torch.equal(frozen_before[k], v) for k, v in frozen_after.items())  # BatchNorm stats included
    assert all(
        not p.requires_grad and p.grad is None for m in (preds.segmentor, preds.regressor) for p in m.parameters()
    )
    assert all(torch.equal(flows_before[k], v) for k, v in dscm.attributes.state_dict().items())
    assert all(torch.equal(encoder_before[k], v) for k, v in dscm.image.encoder.state_dict().items())
    assert any(not torch.equal(decoder_before[k], v) for k, v in dscm.image.decoder.state_dict().items())
    assert float(cft.multiplier.value) > 0.0  # nelbo above eps raised lambda
    assert result.summary["steps"] == 3 and result.weights.is_file()
    saved = load_tensors(list_checkpoints(tmp_path)[-1] / "model.safetensors")  # lambda is checkpointed
    assert float(saved["multiplier.value"]) > 0.0


def test_no_cft_keeps_the_pretrained_weights(tmp_path: Path) -> None:
    dscm = tiny_dscm()
    before = {k: v.clone() for k, v in dscm.state_dict().items()}
    cft = cft_for(dscm, [], predictors())
    config = TrainConfig(steps=3, batch_size=4)
    result = finetune_dscm(cft, DATA, config, tmp_path, make_accelerator(config, tmp_path), seed=0)
    assert result.summary["steps"] == 0 and result.summary["no_cft"]
    assert all(torch.equal(before[k], v) for k, v in dscm.state_dict().items())
    saved = load_tensors(result.weights)
    assert all(torch.equal(before[k], saved[k]) for k in before)


def test_repeated_guidance_terms_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="appear twice"):
        build_strategies([RegressorGuidanceConfig(), RegressorGuidanceConfig(weight=2)], load_registry(), predictors())


def test_cft_step_runs_the_encoder_once_with_the_objective_of_separate_calls() -> None:
    """One encoder pass for the factual loss and the abduction: the same step as loss() then abduct()."""
    dscm, preds = tiny_dscm(), predictors()
    cft = cft_for(dscm, [PositionalSegmentorGuidanceConfig()], preds, constraint="fixed").eval()
    calls = []
    dscm.image.encoder.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(3)
    shared = cft(batch())
    assert len(calls) == 1
    dscm.image.loss_and_abduct = None  # a mechanism without it: the separate calls, two encoder passes
    torch.manual_seed(3)
    separate = cft(batch())
    assert len(calls) == 3
    for key in ("loss", "nelbo", "guidance"):
        torch.testing.assert_close(shared[key], separate[key])
