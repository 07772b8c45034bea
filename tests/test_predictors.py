"""The U-Net segmentor, the timm regressor and frozen loading from safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalimg.core.transform import VariableTransform
from causalimg.data.phantom import CLASSES as CLASS_NAMES
from causalimg.errors import ConfigError, DataError
from causalimg.io import load_module, save_tensors
from causalimg.predictors.configs import RegressorConfig, SegmentorConfig
from causalimg.predictors.frozen import freeze, load_frozen
from causalimg.predictors.regressor import build_regressor, evaluate_mae, regressor_objective
from causalimg.predictors.unet import UNet, dice_ce_loss, evaluate_dice, segmentor_objective

SMALL = SegmentorConfig(widths=(8, 16, 32))
NUM_CLASSES = len(CLASS_NAMES)


def stripes(batch: int = 4, h: int = 16, w: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """Noisy images whose label is coded by intensity: easy for a segmentor to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, h, w, dtype=torch.long)
    labels[:, 6:10] = 1
    for b in range(batch):
        c0 = int(torch.randint(0, w - 8, (1,), generator=g))
        labels[b, 4:6, c0 : c0 + 6] = 2
        labels[b, 10:12, (c0 + 20) % (w - 8) : (c0 + 20) % (w - 8) + 8] = 3
    levels = torch.tensor([-0.8, 0.8, 0.3, -0.2])
    image = levels[labels][:, None] + 0.05 * torch.randn(batch, 1, h, w, generator=g)
    return {"image": image, "labels": labels}


@pytest.mark.parametrize(("h", "w"), [(16, 48), (32, 8), (8, 8)])
def test_unet_shapes_for_square_and_non_square_inputs(h: int, w: int) -> None:
    net = UNet(SMALL, num_classes=NUM_CLASSES)
    x = torch.randn(2, 1, h, w)
    assert net(x).shape == (2, NUM_CLASSES, h, w)
    assert net.features(x).shape == (2, 32)


def test_unet_rejects_a_shape_its_depth_cannot_halve() -> None:
    with pytest.raises(ConfigError, match=r"divisible by 4; got 10 x 48"):
        UNet(SMALL, num_classes=NUM_CLASSES)(torch.randn(1, 1, 10, 48))
    with pytest.raises(ConfigError, match=r"\(B, 1, H, W\)"):
        UNet(SMALL, num_classes=NUM_CLASSES)(torch.randn(1, 3, 16, 48))


def test_dice_ce_loss_is_small_for_confident_right_logits_and_large_for_wrong_ones() -> None:
    labels = stripes()["labels"]
    right = 20.0 * F.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
    wrong = 20.0 * F.one_hot((labels + 1) % NUM_CLASSES, NUM_CLASSES).permute(0, 3, 1, 2).float()
    good, bad = dice_ce_loss(right, labels), dice_ce_loss(wrong, labels)
    assert float(good["loss"]) < 1e-3
    assert float(bad["dice"]) > 0.99 and float(bad["ce"]) > 10
    assert set(good) == {"loss", "ce", "dice"}


def test_segmentor_learns_intensity_coded_labels() -> None:
    torch.manual_seed(0)
    net = UNet(SMALL, num_classes=NUM_CLASSES)
    batch = stripes(batch=8)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = float(segmentor_objective(net, batch)["loss"].detach())
    for _ in range(60):
        opt.zero_grad()
        segmentor_objective(net, batch)["loss"].backward()
        opt.step()
    assert float(segmentor_objective(net, batch)["loss"].detach()) < 0.5 * first
    dice = evaluate_dice(net, [stripes(batch=4, seed=1)], CLASS_NAMES)
    assert list(dice) == list(CLASS_NAMES)
    assert dice["background"] > 0.9 and dice["lumen"] > 0.9
    assert net.training  # evaluation restores the mode


def test_evaluate_dice_counts_pixels_over_the_whole_split() -> None:
    class Fixed(nn.Module):
        def __init__(self, labels: torch.Tensor):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.labels = labels

        def forward(self, x):
            return F.one_hot(self.labels, NUM_CLASSES).permute(0, 3, 1, 2).float() + self.w

    labels = torch.zeros(1, 2, 4, dtype=torch.long)
    labels[0, 0, :2] = 1  # 2 lumen pixels
    pred = labels.clone()
    pred[0, 0, 0] = 0  # one of them missed
    dice = evaluate_dice(Fixed(pred), [{"image": torch.zeros(1, 1, 2, 4), "labels": labels}], CLASS_NAMES)
    assert dice["lumen"] == pytest.approx(2 * 1 / (1 + 2))
    assert dice["background"] == pytest.approx(2 * 6 / (7 + 6))
    assert dice["calcified"] == 1.0  # absent and never predicted


def test_regressor_is_a_one_channel_timm_resnet_with_one_output_per_variable() -> None:
    net = build_regressor(RegressorConfig(model="resnet10t"), 9)
    assert net(torch.randn(2, 1, 32, 192)).shape == (2, 9)
    with pytest.raises(ConfigError, match="regressor.model 'resnet-nope'"):
        build_regressor(RegressorConfig(model="resnet-nope"), 9)


def test_regressor_objective_and_mae_in_data_units() -> None:
    transform = VariableTransform(("a", "b"), torch.tensor([0.0, 10.0]), torch.tensor([4.0, 30.0]))

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Parameter(torch.tensor([0.0, 0.0]))  # normalised: a = 2, b = 20

        def forward(self, x):
            return self.out.expand(x.shape[0], -1)

    parents = torch.tensor([[1.0, 20.0], [4.0, 26.0]])
    batch = {"image": torch.zeros(2, 1, 4, 4), "parents": parents}
    mae = evaluate_mae(Constant(), [batch], transform)
    assert mae == pytest.approx({"a": 1.5, "b": 3.0})
    out = regressor_objective(Constant(), batch, transform)
    normalised = transform.normalise(parents)
    assert float(out["loss"].detach()) == pytest.approx(float((normalised**2).mean()))


def test_freeze_stops_gradients_and_batchnorm_statistics() -> None:
    net = freeze(build_regressor(RegressorConfig(model="resnet10t"), 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 1, 16, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training


def test_safetensors_round_trip_and_refusals(tmp_path: Path) -> None:
    net = UNet(SMALL, num_classes=NUM_CLASSES)
    path = tmp_path / "seg.safetensors"
    save_tensors(path, net.state_dict())
    other = load_frozen(UNet(SMALL, num_classes=NUM_CLASSES), path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert not other.training and not any(p.requires_grad for p in other.parameters())
    with pytest.raises(DataError, match="from .safetensors files only"):
        load_module(UNet(SMALL, num_classes=NUM_CLASSES), tmp_path / "seg.pt")
    with pytest.raises(DataError, match="not found"):
        load_module(UNet(SMALL, num_classes=NUM_CLASSES), tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match="do not fit UNet"):
        load_module(UNet(SegmentorConfig(widths=(8, 16)), num_classes=NUM_CLASSES), path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_module(UNet(SMALL, num_classes=NUM_CLASSES), tmp_path / "bad.safetensors")
