"""Warm start: begin training from (part of) another model's weights (``model.init_from``).

A model is rarely trained from nothing when a related one exists: the video-text matcher's video
tower starts from the video classifier, a generator's text tower from the matcher's. The source's
tensors whose names (after swapping ``source_prefix`` for ``target_prefix``) and shapes match the
new model's are copied, parameters and buffers alike (BatchNorm statistics travel with their
weights); the rest of the new model keeps its initialisation. Pure PyTorch: the caller loads the
source (from the registry or a directory) and passes its state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping

import torch
from torch import nn


@dataclass
class WarmStartReport:
    copied: List[str] = field(default_factory=list)  # target names
    shape_mismatch: List[str] = field(default_factory=list)  # target names whose shapes differ
    frozen: int = 0  # parameters whose requires_grad was switched off

    def summary(self) -> Dict[str, int]:
        return {"warm_start_copied": len(self.copied), "warm_start_shape_mismatch": len(self.shape_mismatch),
                "warm_start_frozen": self.frozen}


def warm_start(model: nn.Module, source: Mapping[str, torch.Tensor], *, source_prefix: str = "",
               target_prefix: str = "", freeze: bool = False) -> WarmStartReport:
    """Copy ``source`` tensors into ``model`` in place: a source name ``source_prefix + rest`` goes to
    ``target_prefix + rest`` when the model has that tensor with the same shape. With ``freeze`` the
    copied parameters stop training (their requires_grad is switched off)."""
    target = model.state_dict()
    report = WarmStartReport()
    copied = {}
    for name, tensor in source.items():
        if not name.startswith(source_prefix):
            continue
        dst = target_prefix + name[len(source_prefix):]
        if dst not in target:
            continue
        if tuple(target[dst].shape) != tuple(tensor.shape):
            report.shape_mismatch.append(dst)
            continue
        copied[dst] = tensor
        report.copied.append(dst)
    with torch.no_grad():
        for dst, tensor in copied.items():
            target[dst].copy_(tensor.to(dtype=target[dst].dtype, device=target[dst].device))
    if freeze:
        for name, p in model.named_parameters():
            if name in copied and p.requires_grad:
                p.requires_grad_(False)
                report.frozen += 1
    return report
