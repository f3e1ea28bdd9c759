"""One optimizer step over accumulated micro-batches, and one evaluation pass (pure PyTorch).

``amp`` is a zero-argument callable returning the autocast context of the run's precision (a null
context in fp32); ``scaler`` a torch.amp.GradScaler (disabled unless fp16).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from heygen_ray.train.tasks import DataInfo, Task

Amp = Callable[[], ContextManager[Any]]


def optimizer_step(model: nn.Module, base: nn.Module, task: Task, micro_batches: List[Dict[str, torch.Tensor]],
                   opt: torch.optim.Optimizer, scaler: Any, amp: Amp, clip_norm: Optional[float], *, step: Optional[int] = None,
                   collect: Optional[List[Tuple[Any, torch.Tensor]]] = None) -> Tuple[float, float]:
    """One optimizer step over ``len(micro_batches)`` accumulated micro-batches.

    Each micro-loss is divided by the number of micro-batches, so the update equals the one of a
    single batch k times larger; under DDP the gradient all-reduce runs only on the last micro-batch
    (``no_sync`` on the others). ``collect`` receives each micro-batch's (detached output, targets)
    (a GAN's discriminator step reuses them). Returns (mean micro-batch loss, gradient norm before
    clipping).
    """
    k = len(micro_batches)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        inputs, targets = task.inputs(batch)
        last = i == k - 1
        sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with amp():
                out = model(**inputs, **task.forward_kwargs)
            loss = task.loss(out, targets, step=step) / k
            scaler.scale(loss).backward()
        if collect is not None:
            collect.append((task.prediction(out).detach(), targets))
        total += float(loss.detach()) * k
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), clip_norm or float("inf"))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return total / k, float(grad_norm)


@torch.no_grad()
def evaluate(models: Mapping[str, nn.Module], batches: Iterable[Dict[str, torch.Tensor]], task: Task, info: DataInfo,
             device: torch.device, amp: Amp,
             first: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Tuple[Dict[str, float], Dict[str, Any]]]:
    """(metrics, state) of each model over ``batches``, in one pass: the validation set is read (and,
    when streamed, decoded) once for the raw and the EMA model. An empty ``first`` dict receives the
    first batch (kept for samples)."""
    training = [m for m in models.values() if m.training]  # restored after; a loaded (eval) model stays so
    for m in training:
        m.eval()
    states = {name: task.new_metrics(info) for name in models}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if first is not None and not first:
            first.update(batch)
        inputs, targets = task.inputs(batch)
        for name, m in models.items():
            with amp():
                out = m(**inputs, **task.forward_kwargs)
            task.update_metrics(states[name], out, targets, batch)
    for m in training:
        m.train()
    return {name: (task.compute_metrics(st), st) for name, st in states.items()}
