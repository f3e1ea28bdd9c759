"""The architecture of a model whose widths differ from its registry preset (a structurally pruned one).

Structured pruning removes channels, attention heads and FFN units, so the model no longer matches
the preset its registry name builds. Its shapes are recorded as an *architecture*: plain JSON with
the width attributes of every module (``in_features``, ``num_attention_heads``, ...) and the shape of
every tensor of the state dict. :func:`apply_architecture` replays it on a freshly built preset, which
can then load the pruned weights; saved models carry it in model.json, so nothing is pickled.

    arch = architecture(pruned)                       # JSON-able
    fresh = apply_architecture(create_model(name), arch)
    fresh.load_state_dict(pruned.state_dict())

Pure PyTorch and the model zoo: no ray, no mlflow.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
from torch import nn

ARCH_ATTR = "heygen_architecture"  # set on a model whose shapes differ from its registry preset
_SHAPE_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_groups", "num_channels",
                "normalized_shape", "num_features", "num_attention_heads")


def refresh_model_widths(base: nn.Module) -> None:
    """ModelBase bookkeeping that follows the layers (num_features = the classifier's input width);
    called after a model's layers were resized."""
    from heygen_ray.models.base import ModelBase

    for m in base.modules():
        if isinstance(m, ModelBase):
            head = m.get_classifier()
            if isinstance(head, nn.Linear):
                m.num_features = head.in_features
            m._flops_cache.clear()


def widths(model: nn.Module) -> Dict[str, Any]:
    """A short summary of what is left: conv output channels, FFN hidden units, heads per block."""
    from heygen_ray.models.layers import FeedForwardNetwork

    out: Dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not name.endswith("shortcut.0"):
            out[name] = m.out_channels
        elif isinstance(m, FeedForwardNetwork):
            out[name + ".hidden"] = m.fc2.in_features
        elif hasattr(m, "qkv") and hasattr(m, "num_attention_heads"):
            out[name + ".heads"] = m.num_attention_heads
    return out


def architecture(model: nn.Module) -> Dict[str, Any]:
    """JSON-able description of every width in ``model``: module attributes and tensor shapes."""
    modules: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        attrs = {}
        for a in _SHAPE_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
                attrs[a] = list(v) if isinstance(v, (tuple, list)) else int(v)
        if attrs:
            modules[name] = attrs
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"modules": modules, "shapes": shapes}


def apply_architecture(model: nn.Module, arch: Mapping[str, Any]) -> nn.Module:
    """Reshape a freshly built preset to ``arch`` (from :func:`architecture`) in place: module
    widths and head counts are set and every tensor is replaced by an uninitialised one of the
    recorded shape, ready for ``load_state_dict``."""
    for name, attrs in arch.get("modules", {}).items():
        try:
            m = model.get_submodule(name) if name else model
        except AttributeError:
            raise ValueError(f"architecture names module {name!r}, which {type(model).__name__} does not have") from None
        for a, v in attrs.items():
            if hasattr(m, a):
                setattr(m, a, tuple(v) if isinstance(v, list) else v)
    for key, shape in arch.get("shapes", {}).items():
        mod_name, _, attr = key.rpartition(".")
        m = model.get_submodule(mod_name) if mod_name else model
        cur = getattr(m, attr, None)
        if cur is None or list(cur.shape) == list(shape):
            continue
        new = torch.empty(shape, dtype=cur.dtype, device=cur.device)
        if isinstance(cur, nn.Parameter):
            setattr(m, attr, nn.Parameter(new, requires_grad=cur.requires_grad))
        else:
            m._buffers[attr] = new
    refresh_model_widths(model)
    setattr(model, ARCH_ATTR, dict(arch))
    return model
