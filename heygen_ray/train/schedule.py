"""Learning-rate schedules: linear warmup, then cosine | linear | constant, per optimizer step.

Built from torch's own schedulers (no hand-written LR math), so `state_dict()` checkpoints them.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

KINDS = ("cosine", "linear", "constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: str,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 1e-3,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Step it once per optimizer step. After ``warmup_steps`` the LR decays from the peak to
    ``min_lr_ratio * peak`` at ``total_steps`` (cosine or linear), or stays at the peak (constant)."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose from {KINDS}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
    decay_steps = total_steps - warmup_steps
    if kind == "cosine":
        peak = optimizer.param_groups[0]["lr"]
        main: LRScheduler = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=peak * min_lr_ratio)
    elif kind == "linear":
        main = LinearLR(optimizer, start_factor=1.0, end_factor=max(min_lr_ratio, 0.0), total_iters=decay_steps)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return main
    warm = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])
