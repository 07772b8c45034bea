"""The hvae image mechanism: non-square shapes, exact abduction, presets, config errors, fitting."""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from causalimg.core.mechanism import Exogenous
from causalimg.errors import ConfigError
from causalimg.mechanisms.hvae import (
    HVAE,
    HVAEConfig,
    causalimg_image_mechanisms,
    resolve,
    stage_resolutions,
)
from causalimg.mechanisms.hvae_blocks import GroupNorm

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(shape: tuple[int, int], **overrides) -> HVAEConfig:
    n = len(stage_resolutions(shape))
    widths = tuple(min(8 * 2**i, 32) for i in range(n))
    fields = dict(preset=None, widths=widths, enc_blocks=(1,) * n, dec_blocks=(1,) * n, bottleneck=0.5,
                  z_dim=4, embed_dim=16, dropout=0.0)  # fmt: skip
    return HVAEConfig(**{**fields, **overrides})


def tiny(shape: tuple[int, int], num_parents: int = 2, **overrides) -> HVAE:
    torch.manual_seed(0)
    return HVAE.from_config(tiny_config(shape, **overrides), image_shape=shape, num_parents=num_parents)


def test_stage_resolutions_for_wide_and_tall_inputs() -> None:
    assert stage_resolutions((32, 192)) == ((32, 192), (16, 96), (8, 48), (4, 24), (2, 12), (1, 6), (1, 1))
    assert stage_resolutions((48, 16)) == ((48, 16), (24, 8), (12, 4), (6, 2), (3, 1), (1, 1))
    assert stage_resolutions((12, 36), ((3, 3), (4, 12))) == ((12, 36), (4, 12), (1, 1))


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (8, 8)])
def test_shapes_loss_and_exact_abduction(shape: tuple[int, int]) -> None:
    model = tiny(shape).eval()
    x = torch.rand(3, 1, *shape) * 2 - 1
    pa = torch.rand(3, 2) * 2 - 1
    out = model.loss(x, pa)
    assert set(out) == {"loss", "nelbo", "nll", "kl"} and torch.equal(out["loss"], out["nelbo"])
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out["nelbo"], out["nll"] + model.beta * out["kl"])
    assert (out["kl"] >= 0).all()
    with torch.no_grad():
        exo = model.abduct(x, pa)
        assert isinstance(exo, Exogenous) and exo.noise.shape == x.shape
        stochastic = [r for r in model.arch.resolutions[::-1][: model.arch.latent_stages]]
        assert [tuple(z.shape[-2:]) for z in exo.latents] == stochastic  # one block per stage here
        assert all(z.shape[:2] == (3, 4) for z in exo.latents)
        torch.testing.assert_close(model.predict(exo, pa), x, atol=1e-5, rtol=0)
        other = model.predict(exo, -pa)
        assert other.shape == x.shape and other.abs().max() <= 1
        assert model.sample(pa, t=0.5).shape == x.shape
        assert model.reconstruct(x, pa).shape == x.shape


def test_parents_change_the_decoded_image() -> None:
    model = tiny((16, 48)).eval()
    with torch.no_grad():  # un-zero the last layers so the parents' path is live
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.rand(2, 1, 16, 48) * 2 - 1
        exo = model.abduct(x, torch.zeros(2, 2))
        assert (model.predict(exo, torch.ones(2, 2)) - model.predict(exo, torch.zeros(2, 2))).abs().max() > 1e-3


def test_checkpointing_and_channels_last_compute_the_same_numbers() -> None:
    x = torch.rand(4, 1, 16, 48) * 2 - 1
    pa = torch.rand(4, 2)
    losses, grads = [], []
    runs = [
        (False, torch.contiguous_format, 0.1),
        (True, torch.contiguous_format, 0.1),
        (False, torch.channels_last, 0.0),
    ]
    for checkpointing, fmt, dropout in runs:  # dropout masks follow memory order: none for channels_last
        model = tiny((16, 48), checkpointing=checkpointing, dropout=dropout).to(memory_format=fmt)
        torch.manual_seed(1)  # same posterior noise and dropout masks
        loss = model.loss(x.contiguous(memory_format=fmt), pa)["nelbo"].mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(losses[1], losses[0]) and torch.equal(grads[1], grads[0])  # checkpointing: bit-exact
    model = tiny((16, 48), dropout=0.0)
    torch.manual_seed(1)
    reference = model.loss(x, pa)["nelbo"].mean()
    reference.backward()
    torch.testing.assert_close(losses[2], reference.detach(), rtol=1e-5, atol=1e-6)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (grads[2] - grad).norm() < 1e-3 * grad.norm()  # summation order differs, nothing else


@pytest.mark.parametrize(("shape", "params_m", "blocks"), [((32, 192), 29.0, (38, 48)), ((64, 384), 38.4, (43, 63))])
def test_paper_preset_has_the_published_capacity(shape, params_m, blocks) -> None:
    arch = resolve(HVAEConfig(preset="paper"), shape)
    assert (sum(arch.enc_blocks), sum(arch.dec_blocks)) == blocks
    assert arch.widths[0] == 32 and arch.widths[-1] == 512 and arch.z_dim == 16
    assert arch.resolutions[-1] == (1, 1) and len(arch.resolutions) == {(32, 192): 7, (64, 384): 8}[shape]
    model = HVAE(arch, num_parents=9)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.02, n


def test_cpu_preset_is_a_few_million_parameters() -> None:
    model = HVAE.from_config(HVAEConfig(), image_shape=(32, 192), num_parents=9)
    assert 1.0 < sum(p.numel() for p in model.parameters()) / 1e6 < 5.0


@pytest.mark.parametrize(
    ("config", "shape", "message"),
    [
        (dict(preset="paper"), (16, 48), "'paper' is defined for 7 or 8 resolutions"),
        (dict(preset="cpu", widths=(8, 16)), (16, 48), r"widths has 2 entries; the 6 resolutions are 16x48 -> 8x24"),
        (dict(preset=None), (16, 48), "hvae.widths is required when preset is null"),
        (dict(stage_factors=((2, 2), (3, 3))), (16, 48), r"\(3, 3\) does not divide the 8 x 24 stage"),
        (dict(stage_factors=((2, 2),)), (16, 48), "ends at 8 x 24, not 1 x 1"),
        (dict(latent_stages=9), (16, 48), "latent_stages=9 exceeds"),
    ],
)
def test_bad_architectures_are_config_errors(config, shape, message) -> None:
    with pytest.raises(ConfigError, match=message):
        HVAE.from_config(HVAEConfig(**config), image_shape=shape, num_parents=2)


def test_config_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(pydantic.ValidationError, match="widht"):
        HVAEConfig(widht=(8,))
    with pytest.raises(pydantic.ValidationError, match="dropout"):
        HVAEConfig(dropout=1.5)


def test_wrong_input_shapes_are_named() -> None:
    model = tiny((16, 48))
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 48\)"):
        model.loss(torch.zeros(2, 1, 48, 16), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model.loss(torch.zeros(2, 1, 16, 48), torch.zeros(2, 3))


def test_plugin_record() -> None:
    (spec,) = causalimg_image_mechanisms()
    assert spec.name == "hvae" and spec.config is HVAEConfig
    model = spec.factory(tiny_config((8, 8)), image_shape=(8, 8), num_parents=1)
    assert isinstance(model, HVAE)


def synthetic_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16 x 48 images: a bright horizontal band whose thickness is the parent, plus a random blob."""
    thickness = torch.randint(2, 9, (n,), generator=generator)
    rows = torch.arange(16).reshape(1, 16, 1)
    band = (rows - 8).abs() < thickness.reshape(-1, 1, 1) / 2
    cols = torch.arange(48).reshape(1, 1, 48)
    centre = torch.randint(6, 42, (n, 1, 1), generator=generator)
    blob = (cols - centre).abs() < 3
    x = torch.full((n, 16, 48), -1.0)
    x = torch.where(band, 0.6, x)
    x = torch.where(blob & ~band, 0.2, x)
    pa = ((thickness.float() - 2) / 6 * 2 - 1).reshape(n, 1)
    return x.unsqueeze(1), pa


@pytest.mark.slow
def test_tiny_hvae_fits_and_reconstructs() -> None:
    """A few hundred steps lower the nelbo well below its start and reconstruct to a stated error."""
    gen = torch.Generator().manual_seed(0)
    x, pa = synthetic_images(128, gen)
    model = tiny((16, 48), num_parents=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.9))
    with torch.no_grad():
        start = model.eval().loss(x, pa)["nelbo"].mean().item()
    model.train()
    for _step in range(300):
        idx = torch.randint(0, 128, (32,), generator=gen)
        opt.zero_grad()
        model.loss(x[idx], pa[idx])["nelbo"].mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = model.loss(x, pa)["nelbo"].mean().item()
        recon = model.reconstruct(x, pa)
        exo = model.abduct(x, pa)
        cf = model.predict(exo, pa)
    assert end < start - 1.0, (start, end)
    error = (recon - x).abs().mean().item()  # mean absolute error on [-1, 1], no pixel noise
    assert error < 0.1, error
    torch.testing.assert_close(cf, x, atol=1e-4, rtol=0)


def test_loss_and_abduct_share_one_encoder_pass_with_the_same_numbers() -> None:
    model = tiny((16, 48)).eval()
    x = torch.rand(3, 1, 16, 48) * 2 - 1
    pa = torch.rand(3, 2) * 2 - 1
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    factual, exo = model.loss_and_abduct(x, pa, t=0.3)
    assert len(calls) == 1
    torch.manual_seed(1)
    expected = model.loss(x, pa)
    expected_exo = model.abduct(x, pa, t=0.3)
    for key in ("nelbo", "nll", "kl"):
        torch.testing.assert_close(factual[key], expected[key])
    torch.testing.assert_close(exo.noise, expected_exo.noise)
    # t = 0.3 draws posterior noise: the loss's draws come first in both orders, then the abduction's
    for z, z_expected in zip(exo.latents, expected_exo.latents, strict=True):
        torch.testing.assert_close(z, z_expected)
    (factual["nelbo"].sum() + sum(z.sum() for z in exo.latents)).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize(("groups", "channels"), [(1, 13), (1, 26), (2, 16)])
def test_group_norm_matches_torch_in_every_layout(groups: int, channels: int) -> None:
    """The layer-norm route for one-group channels_last maps: same values and gradients as nn.GroupNorm."""
    torch.manual_seed(0)
    ours = GroupNorm(groups, channels)
    nn.init.normal_(ours.weight)
    nn.init.normal_(ours.bias)
    reference = nn.GroupNorm(groups, channels)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, channels, 4, 6) * 2 + 1
    g = torch.randn(3, channels, 4, 6)
    for fmt in (torch.channels_last, torch.contiguous_format):
        outs = []
        for norm in (ours, reference):
            xi = x.contiguous(memory_format=fmt).requires_grad_()
            y = norm(xi)
            outs.append((y, *torch.autograd.grad((y * g).sum(), (xi, norm.weight, norm.bias))))
        assert outs[0][0].is_contiguous(memory_format=fmt)
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
