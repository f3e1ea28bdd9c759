"""Exponential moving average of the weights with torch's AveragedModel.

ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t, with d_t = decay, or with warmup
d_t = min(decay, (1 + n) / (10 + n)) where n counts previous updates, so early averages are not
dominated by the random initialisation. The first update copies the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, num_averaged: int, warmup: bool) -> float:
    """The decay used for the update after ``num_averaged`` earlier updates."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged)) if warmup else decay


def make_ema(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An AveragedModel of ``model`` (pass the unwrapped model, not the DDP wrapper)."""

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = ema_decay(decay, int(num_averaged), warmup)
        return averaged * d + current * (1.0 - d)

    return AveragedModel(model, avg_fn=avg_fn, use_buffers=True)
