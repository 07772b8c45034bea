"""What several processes share: the seeding of every random generator and a mean over processes."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over every process of the group (itself when there is one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
