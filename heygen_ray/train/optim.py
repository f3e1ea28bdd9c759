"""The optimizer side of a training: AdamW parameter groups and the LR schedule at a given step.

Pure PyTorch (the specs are read, nothing else): shared by the model's optimizer and a GAN
discriminator's (heygen_ray.train.gan), which has its own optimizer and schedule sections.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from heygen_ray.train.schedule import build_scheduler

NO_DECAY_NAMES = ("pos_embed", "cls_token", "relative_position_bias_table", "embedding", "rel_bias")


def param_groups(model: nn.Module, weight_decay: float, lr_scales: Optional[Mapping[str, float]] = None) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights, embeddings, tokens and position tables
    (every parameter with fewer than 2 dims, plus names that say so). ``lr_scales``: parameter name
    -> learning-rate multiplier (warm-started weights fine-tuned gently); each group carries its
    ``lr_scale`` (1.0 by default), which `schedule_at` applies."""
    groups: Dict[Tuple[bool, float], List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES)
        scale = float((lr_scales or {}).get(name, 1.0))
        groups.setdefault((not skip, scale), []).append(p)
    out = []
    for decay in (True, False):  # the decayed group first: checkpointed optimizer states index groups in this order
        for (d, scale), params in sorted(groups.items(), key=lambda kv: -kv[0][1]):
            if d == decay:
                out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
    return out


def adamw(model: nn.Module, optim: Any, lr_scales: Optional[Mapping[str, float]] = None) -> torch.optim.AdamW:
    """AdamW over ``model``'s `param_groups` with the settings of an OptimSpec (``optim``)."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay, lr_scales), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps)


def schedule_at(opt: torch.optim.Optimizer, spec: Any, step: int, optim: Any = None, schedule: Any = None):
    """A fresh scheduler for the current spec (a TrainSpec), advanced to ``step``. The LR is a
    function of the step and the plan, so a resumed job that extends ``steps`` follows its new plan
    (a restored scheduler state would keep the old horizon). ``optim``/``schedule``: another
    optimizer's sections (the discriminator's); default the model's."""
    optim, schedule = optim or spec.optim, schedule or spec.schedule
    for group in opt.param_groups:
        group["lr"] = optim.lr * group.get("lr_scale", 1.0)
        group.pop("initial_lr", None)
    sched = build_scheduler(opt, kind=schedule.kind, total_steps=spec.steps, warmup_steps=schedule.warmup_steps,
                            warmup_start_factor=schedule.warmup_start_factor, min_lr_ratio=schedule.min_lr_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(step):
            sched.step()
    return sched
