"""The Reg-CFT regressor: a timm ResNet reading every causal variable (normalised) from an image."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

from causalimg.core.transform import VariableTransform
from causalimg.errors import ConfigError
from causalimg.predictors.configs import RegressorConfig


def build_regressor(config: RegressorConfig, num_outputs: int) -> nn.Module:
    """(B, 1, H, W) image -> (B, num_outputs) normalised variables."""
    try:
        return timm.create_model(config.model, pretrained=False, in_chans=1, num_classes=num_outputs)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ConfigError(f"predictors.regressor.model {config.model!r} is not a timm model: {err}") from err


def regressor_objective(
    model: nn.Module, batch: Mapping[str, torch.Tensor], transform: VariableTransform, loss: str = "l2"
) -> dict[str, torch.Tensor]:
    """Training objective for the generic loop: error on normalised parents, ``{"loss", "mae"}``."""
    pred = model(batch["image"])  # (B, P) normalised
    target = transform.normalise(batch["parents"])  # (B, P)
    error = F.mse_loss(pred, target) if loss == "l2" else F.l1_loss(pred, target)
    return {"loss": error, "mae": (pred - target).abs().mean().detach()}


@torch.no_grad()
def evaluate_mae(
    model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], transform: VariableTransform
) -> dict[str, float]:
    """Mean absolute error per variable in data units (mm^2) over a whole split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    error_sum = torch.zeros(len(transform.names), dtype=torch.float64, device=device)
    count = 0
    for batch in loader:
        pred = transform.denormalise(model(batch["image"].to(device)))  # (B, P) mm^2
        error_sum += (pred - batch["parents"].to(device)).abs().sum(0).double()
        count += pred.shape[0]
    model.train(was_training)
    return {name: float(e) / max(count, 1) for name, e in zip(transform.names, error_sum)}
