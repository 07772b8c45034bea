"""Exponential moving average of a model's weights: the weights people evaluate and keep."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copy of ``model.state_dict()`` updated after every optimiser step that was taken.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run's
    average is not dominated by the random initialisation; long runs use ``decay`` itself.
    Integer buffers (counters) are copied, not averaged; parameters frozen when the EMA is made
    (``requires_grad=False``, e.g. a frozen encoder during fine-tuning) are kept as they were.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._frozen = {k for k, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        for key, value in model.state_dict().items():
            if key in self._frozen:
                continue
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), weight)
            else:
                shadow.copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture)."""
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"updates": self.updates, **{f"shadow.{k}": v for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor | int | float | bool]) -> None:
        self.updates = int(state["updates"])
        for key, value in state.items():
            if key.startswith("shadow.") and isinstance(value, Tensor):
                self.shadow[key.removeprefix("shadow.")].copy_(value)
