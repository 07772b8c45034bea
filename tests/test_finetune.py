"""Counterfactual fine-tuning with a tiny HVAE and spline flows on intensity-coded scenes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from causalimg.builder import Builder
from causalimg.config.loader import load_config
from causalimg.config.sections import TrainConfig
from causalimg.core.guidance import GuidancePredictors
from causalimg.core.schema import Variable
from causalimg.core.scm import DSCM
from causalimg.core.transform import VariableTransform
from causalimg.data.phantom import phantom_schema
from causalimg.errors import ConfigError, DataError
from causalimg.io import load_tensors
from causalimg.plugins.manager import load_registry
from causalimg.training.accelerator import make_accelerator
from causalimg.training.checkpoint import list_checkpoints
from causalimg.training.finetune import CounterfactualFineTuning, LagrangeMultiplier, measure_nelbo, select_trainable
from causalimg.training.loop import fit

REGIONS = ("proximal", "mid", "distal")
SCHEMA = phantom_schema(REGIONS, with_age=False)
LUMEN, CALCIFIED = SCHEMA.structure("la").label, SCHEMA.structure("cpa").label
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
        onehot = F.one_hot(labels, SCHEMA.num_classes).permute(0, 3, 1, 2).float()
        self.images = LEVELS[labels][:, None] + 0.02 * torch.randn(n, 1, H, W, generator=g)
        self.parents = SCHEMA.measure(onehot, thirds()[None], 0.25)  # (n, 9) mm^2
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "parents": self.parents[i], "regions": thirds(), "labels": self.labels[i]}


DATA = Scenes()
TRANSFORM = VariableTransform.fit(SCHEMA.names, DATA.parents)


# The tiny HVAE and flows of these tests, as a run config describes them; everything is built by Builder.
TINY = [
    "image_mechanism={name: hvae, preset: null, widths: [8, 8, 8, 16, 16, 16], enc_blocks: [1, 1, 1, 1, 1, 1], "
    "dec_blocks: [1, 1, 1, 1, 1, 1], bottleneck: 0.5, z_dim: 4, embed_dim: 16, dropout: 0.0}",
    "flows={name: spline-flow, transforms: 1, hidden: [8]}",
    "predictors.segmentor.widths=[8, 16]",
    "predictors.regressor.model=resnet10t",  # has BatchNorm
]


def builder(*strategies: str) -> Builder:
    registry = load_registry()
    overrides = [*TINY, *(f"finetune.strategies.{s}" for s in strategies)]
    return Builder(load_config("tiny", overrides, registry), registry)


def tiny_dscm(seed: int = 0, extra_root: str | None = None) -> DSCM:
    """A tiny HVAE and one spline flow per variable (all roots), optionally with a non-area root first."""
    torch.manual_seed(seed)
    schema, transform = SCHEMA, TRANSFORM
    if extra_root is not None:
        schema = dataclasses.replace(SCHEMA, extra=(Variable(extra_root, unit="years"),))
        transform = VariableTransform((extra_root, *TRANSFORM.names), torch.cat([torch.zeros(1), TRANSFORM.low]),
                                      torch.cat([torch.ones(1), TRANSFORM.high]))  # fmt: skip
    return builder().dscm(schema, (H, W), transform)


def predictors() -> GuidancePredictors:
    torch.manual_seed(1)
    build = builder()
    return GuidancePredictors(segmentor=build.segmentor(SCHEMA), regressor=build.regressor(SCHEMA))


def cft_for(dscm: DSCM, terms: str, preds: GuidancePredictors, **options) -> CounterfactualFineTuning:
    """The CFT module of strategy ``terms`` (YAML list of guidance terms) as the finetune stage builds it."""
    build = builder(f"test={terms}")
    cft = build.finetuning(dscm, build.guidance("test", preds), SCHEMA, 0.25, options.pop("eps", 0.0))
    for name, value in options.items():  # options the tests vary beyond the tiny config
        setattr(cft, name, value)
    return cft


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
    schema = dataclasses.replace(SCHEMA, extra=(Variable("age", unit="years"),))
    cft = CounterfactualFineTuning(dscm, [], schema=schema, pixel_area_mm2=0.25, eps=0.0, interventions_per_step=2)
    torch.manual_seed(0)
    for _ in range(20):
        do, intervened = cft.draw_intervention(torch.zeros(5, len(names)))
        assert len(do) == 2 and "age" not in do
        assert intervened.sum(1).tolist() == [2] * 5 and not intervened[:, 0].any()
        for name, target in do.items():
            i = names.index(name)
            assert target.shape == (5,) and bool(((target >= transform.low[i]) & (target <= transform.high[i])).all())
    with pytest.raises(ConfigError, match="interventions_per_step=10 exceeds the 9"):
        CounterfactualFineTuning(dscm, [], schema=schema, pixel_area_mm2=0.25, eps=0.0, interventions_per_step=10)


def test_fixed_weight_objective_and_reported_terms() -> None:
    dscm, preds = tiny_dscm(), predictors()
    cft = cft_for(dscm, "[{name: positional-segmentor}, {name: regressor, weight: 0.1}]", preds, constraint="fixed",
                  nelbo_weight=2.0)  # fmt: skip
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
    build = builder("test=[{name: positional-segmentor}, {name: regressor, weight: 0.1}]")
    cft = CounterfactualFineTuning(
        dscm, build.guidance("test", preds), schema=SCHEMA, pixel_area_mm2=0.25, eps=eps - 1.0, lagrange_lr=0.1,
        trainable="decoder",
    )  # fmt: skip  # eps below the nelbo: lambda must rise
    flows_before = {k: v.clone() for k, v in dscm.attributes.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in dscm.image.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in dscm.image.decoder.state_dict().items()}
    config = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, ema_decay=0.0, checkpoint_every=3)
    cft.train()
    result = fit(cft, lambda m, b, _: m(b), DATA, config, tmp_path, make_accelerator(config, tmp_path), seed=0,
                 parameters=cft.trainable, weights_prefix="dscm.")  # fmt: skip

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
    weights = load_tensors(result.weights)  # the result is the DSCM alone, as the evaluate stage loads it
    assert set(weights) == set(dscm.state_dict())


def test_repeated_guidance_terms_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="more than once"):
        builder("test=[{name: regressor}, {name: regressor, weight: 2}]")


class SeparateCalls(nn.Module):
    """An image mechanism without the shared pass: the HVAE's loss, abduct, predict and sample alone."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def loss(self, x, pa):
        return self.inner.loss(x, pa)

    def abduct(self, x, pa, t=0.0):
        return self.inner.abduct(x, pa, t)

    def predict(self, exogenous, pa):
        return self.inner.predict(exogenous, pa)

    def sample(self, pa, t=1.0):
        return self.inner.sample(pa, t)


def test_cft_step_runs_the_encoder_once_with_the_objective_of_separate_calls() -> None:
    """One encoder pass for the factual loss and the abduction: the same step as loss() then abduct()."""
    dscm, preds = tiny_dscm(), predictors()
    cft = cft_for(dscm, "[{name: positional-segmentor}]", preds, constraint="fixed").eval()
    calls = []
    dscm.image.encoder.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(3)
    shared = cft(batch())
    assert len(calls) == 1
    dscm.image = SeparateCalls(dscm.image)  # without the shared pass: two calls, two encoder passes
    torch.manual_seed(3)
    separate = cft(batch())
    assert len(calls) == 3
    for key in ("loss", "nelbo", "guidance"):
        torch.testing.assert_close(shared[key], separate[key])
