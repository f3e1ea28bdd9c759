"""The adversarial part of a GAN task, as one optional component of a training.

A task with a discriminator (``task.discriminator``, built by the task from its loss settings) trains
it beside the model: alternating, each optimizer step of the generator is followed by one update of
the discriminator on that step's generated clips. The discriminator has its own optimizer, LR
schedule (``spec.discriminator``) and grad scaler, and travels in every checkpoint beside the model
(the part names are heygen_ray.train.checkpoint's DISCRIMINATOR*).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from heygen_ray.train.checkpoint import DISCRIMINATOR, DISCRIMINATOR_OPTIMIZER, DISCRIMINATOR_SCALER, CheckpointParts
from heygen_ray.train.optim import adamw, schedule_at
from heygen_ray.train.step import Amp
from heygen_ray.train.tasks import Task

METRICS = ("d_loss", "d_real", "d_fake", "d_grad_norm", "d_lr")  # averaged over the steps of a log line


@contextlib.contextmanager
def frozen(module: Optional[nn.Module]) -> Iterator[None]:
    """No gradients into ``module``'s parameters inside the block (the discriminator during the
    generator's step: its weights must not move, and under DDP no gradient hook may fire)."""
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def discriminator_step(d_model: nn.Module, d_base: nn.Module, task: Task, pairs: List[Tuple[torch.Tensor, torch.Tensor]],
                       opt: torch.optim.Optimizer, scaler: Any, amp: Amp, clip_norm: Optional[float]) -> Dict[str, float]:
    """One discriminator update on the generator's (detached output, real clip) pairs of this step,
    accumulated like the generator's optimizer step. Returns the mean hinge loss, logits and
    gradient norm."""
    k = len(pairs)
    sums: Dict[str, float] = {}
    for i, (fake, real) in enumerate(pairs):
        sync = d_model.no_sync() if (i < k - 1 and hasattr(d_model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with amp():
                loss, parts = task.discriminator_loss(fake, real, d_model)
            scaler.scale(loss / k).backward()
        for name, v in parts.items():
            sums[name] = sums.get(name, 0.0) + float(v) / k
    scaler.unscale_(opt)
    sums["d_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(d_base.parameters(), clip_norm or float("inf")))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return sums


@dataclass
class Adversary:
    """The discriminator of a GAN task with its optimizer, schedule and grad scaler.

    ``model`` is the bare discriminator (checkpointed); ``trained`` what its updates run through
    (the DDP wrapper once :meth:`distribute` ran, else ``model``)."""

    spec: Any  # the TrainSpec: its discriminator section and the run's step plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    trained: Optional[nn.Module] = None

    @classmethod
    def build(cls, task: Task, spec: Any, device: torch.device, fp16: bool) -> Optional["Adversary"]:
        """The task's discriminator on ``device`` with a fresh optimizer and schedule; None when the
        task has none (the GAN is off)."""
        if task.discriminator is None:
            return None
        model = task.discriminator.to(device)
        d = spec.discriminator
        opt = adamw(model, d.optim)
        return cls(spec, model, opt, schedule_at(opt, spec, 0, d.optim, d.schedule),
                   torch.amp.GradScaler(device.type, enabled=fp16))

    def add_checkpoint_parts(self, parts: CheckpointParts) -> None:
        """Its module and optimizer state, beside the model's in every checkpoint."""
        parts.modules[DISCRIMINATOR] = self.model
        parts.optimizers[DISCRIMINATOR_OPTIMIZER] = self.optimizer
        parts.optimizers[DISCRIMINATOR_SCALER] = self.scaler

    def schedule_at(self, step: int) -> None:
        """Its LR schedule rebuilt at ``step`` (on resume, like the model's)."""
        d = self.spec.discriminator
        self.scheduler = schedule_at(self.optimizer, self.spec, step, d.optim, d.schedule)

    def distribute(self, prepare_model: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap it for data-parallel updates (``ray.train.torch.prepare_model``)."""
        self.trained = prepare_model(self.model)

    def step(self, task: Task, pairs: List[Tuple[torch.Tensor, torch.Tensor]], amp: Amp) -> Dict[str, float]:
        """One update on this step's (generated, real) pairs, then its schedule's step. Returns its
        METRICS (``d_lr``: the learning rate the update used)."""
        trained = self.trained if self.trained is not None else self.model
        stats = discriminator_step(trained, self.model, task, pairs, self.optimizer, self.scaler, amp,
                                   self.spec.discriminator.optim.grad_clip_norm)
        stats["d_lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return stats
