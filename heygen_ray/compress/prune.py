"""Pruning: structured (channels, attention heads, FFN units physically removed) and unstructured.

Structured pruning runs Torch-Pruning's dependency-graph pruner (`tp.pruner.MetaPruner`) on any zoo
model through the `ModelBase` interface: the classifier (its width is the task's contract) is never
pruned, and on transformers the layers that write into the residual stream (patch embedding,
attention output projection, FFN second layer) keep their width, so what goes is whole attention
heads and FFN hidden units; on 3D CNNs Conv3d output channels (with their GroupNorm/BatchNorm and
the next layer's inputs). Channel counts are rounded to `round_to` (8 by default: odd widths lose
most of the speed-up on oneDNN).

A pruned model no longer matches its registry preset, so its shapes are recorded as an
*architecture* (plain JSON: per-module widths and head counts, per-tensor shapes) that
`heygen_ray.models.architecture.apply_architecture` replays on a freshly built preset before its
weights are loaded. Saved models carry it in model.json; nothing is pickled.

Unstructured pruning (`torch.nn.utils.prune`) only zeroes weights: the tensors keep their shapes,
dense kernels do the same work, so it does not make the model faster or smaller (dense storage).
It is kept as a control (the same share of weights gone, none of the speed-up) and reported as such.

Pure PyTorch (+ torch_pruning): no ray, no mlflow.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from heygen_ray.models.architecture import ARCH_ATTR, architecture, refresh_model_widths, widths

IMPORTANCES = ("l1", "l2", "random", "taylor")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _self_attentions(model: nn.Module) -> List[nn.Module]:
    from heygen_ray.models.layers import MultiHeadCrossAttention

    return [m for m in model.modules() if isinstance(m, MultiHeadCrossAttention) and not m.is_cross_attention]


def _ignored_layers(model: nn.Module) -> List[nn.Module]:
    """Layers whose output width must not change: the classifier, and on transformers every layer
    that writes into the residual stream (so the stream, its norms and position tables stay put)."""
    from heygen_ray.models import unwrap_model
    from heygen_ray.models.layers import FeedForwardNetwork

    base = unwrap_model(model)
    ignored: List[nn.Module] = [m for m in base.get_classifier().modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    attns = _self_attentions(base)
    for a in attns:
        ignored.append(a.proj)
    for ffn in base.modules():
        if isinstance(ffn, FeedForwardNetwork):
            ignored.append(ffn.fc2)
    if attns:  # the residual stream's source: the patch/tubelet embedding
        for name, m in base.named_modules():
            if name.endswith("patch_embed.proj") or name.endswith("token_embedding"):
                ignored.append(m)
    for m in base.modules():  # cross-attention and relative-position tables are not head-aware in tp
        if getattr(m, "is_cross_attention", False):
            ignored.extend([m.q, m.kv, m.proj])
    return ignored


def _importance(kind: str, seed: int):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "random":
        torch.manual_seed(seed)
        return tp.importance.RandomImportance()
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown importance {kind!r}; choose from {IMPORTANCES}")


def structured_prune(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    ratio: float,
    importance: str = "l2",
    round_to: Optional[int] = 8,
    layer_ratios: Optional[Mapping[str, float]] = None,
    global_pruning: bool = False,
    prune_heads: bool = True,
    taylor_batches: Optional[List[Tuple[Dict[str, torch.Tensor], torch.Tensor]]] = None,
    loss_fn: Any = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Remove channels/heads/FFN units from ``model`` in place; returns a report (params and FLOPs
    before/after, the resulting widths). ``ratio``: share of each prunable group's channels to
    remove (``layer_ratios``: {module name: ratio} overrides, e.g. ``{"blocks.0": 0.25}``).
    ``importance``: l1/l2 magnitude, random (the control), or taylor (first-order saliency; needs
    ``taylor_batches`` of (inputs, targets) and ``loss_fn(outputs, targets)``)."""
    import torch_pruning as tp

    from heygen_ray.models import unwrap_model

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    base = unwrap_model(model)
    if any(getattr(m, "use_relative_position", False) for m in base.modules()):
        raise NotImplementedError("structured pruning of relative-position bias tables is not supported")
    inputs = dict(example_inputs)
    params0 = count_params(base)
    flops0 = base.flops_per_sample({k: v[:1] for k, v in inputs.items()})
    was_training = base.training
    base.eval()
    attns = _self_attentions(base) if prune_heads else []
    ignored = _ignored_layers(base)
    per_layer = {base.get_submodule(name): float(r) for name, r in (layer_ratios or {}).items()}
    tp_round_to = round_to
    if round_to and any(isinstance(m, nn.GroupNorm) for m in base.modules()):
        # Torch-Pruning 1.6.1 rounds the per-norm-group count against the whole layer's width when a
        # GroupNorm couples the channels, which removes nothing at all: round here instead, by giving
        # every prunable layer the ratio that lands its width on a multiple of round_to.
        per_layer = _rounded_ratios(base, ratio, per_layer, round_to, ignored)
        tp_round_to = None
    pruner = tp.pruner.MetaPruner(
        base, example_inputs=inputs, importance=_importance(importance, seed), global_pruning=global_pruning,
        pruning_ratio=ratio, pruning_ratio_dict=per_layer or None, ignored_layers=ignored,
        round_to=tp_round_to, num_heads={a.qkv: a.num_attention_heads for a in attns},
        prune_num_heads=bool(attns), prune_head_dims=False, head_pruning_ratio=ratio if attns else 0.0,
        forward_fn=lambda m, x: m(**x),
    )
    if importance == "taylor":
        if not taylor_batches or loss_fn is None:
            raise ValueError("importance='taylor' needs taylor_batches and loss_fn")
        base.zero_grad(set_to_none=True)
        for x, y in taylor_batches:
            loss_fn(base(**x), y).backward()
    pruner.step()
    base.zero_grad(set_to_none=True)
    for a in attns:
        heads = int(pruner.num_heads[a.qkv])
        a.num_attention_heads = heads
        a.mechanism.num_attention_heads = heads
    refresh_model_widths(base)
    base.train(was_training)
    arch = architecture(base)
    setattr(base, ARCH_ATTR, arch)
    params1 = count_params(base)
    flops1 = base.flops_per_sample({k: v[:1] for k, v in inputs.items()})
    return {
        "method": "structured", "importance": importance, "ratio": ratio, "round_to": round_to,
        "params_before": params0, "params_after": params1, "param_reduction": 1.0 - params1 / params0,
        "flops_before": flops0, "flops_after": flops1, "flop_reduction": 1.0 - flops1 / max(flops0, 1),
        "widths": widths(base),
    }


def _rounded_ratios(base: nn.Module, ratio: float, per_layer: Dict[nn.Module, float], round_to: int,
                    ignored: List[nn.Module]) -> Dict[nn.Module, float]:
    """{layer: ratio} that keeps round(width * (1 - ratio) / round_to) * round_to (at least round_to)
    channels of every prunable Linear/Conv output."""
    out: Dict[nn.Module, float] = {}
    for m in base.modules():
        if m in ignored:
            continue
        width = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or not width:
            continue
        r = per_layer.get(m, ratio)
        keep = max(round_to, int(round(width * (1.0 - r) / round_to)) * round_to)
        out[m] = max(0.0, 1.0 - keep / width) if keep < width else r if width <= round_to else 0.0
    return out


# -- unstructured (the control) --------------------------------------------------------------
def unstructured_prune(model: nn.Module, *, amount: float, method: str = "l1", seed: int = 0) -> Dict[str, Any]:
    """Zero the ``amount`` smallest-magnitude (``method="l1"``, global over layers) or random weights
    of every Linear/Conv layer except the classifier, then bake the zeros in (``prune.remove``). The
    shapes, the FLOPs and the dense file size do not change: this is a sparsity *control*, not a speed-up."""
    import torch.nn.utils.prune as tprune

    from heygen_ray.models import unwrap_model

    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    base = unwrap_model(model)
    head = set(base.get_classifier().modules())
    targets = [(m, "weight") for m in base.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m not in head]
    if method == "l1":
        tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=amount)
    elif method == "random":
        torch.manual_seed(seed)
        for m, p in targets:
            tprune.random_unstructured(m, p, amount=amount)
    else:
        raise ValueError(f"unknown unstructured method {method!r}; choose l1 or random")
    for m, p in targets:
        tprune.remove(m, p)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    return {"method": "unstructured", "importance": method, "ratio": amount, "sparsity": zeros / max(total, 1),
            "params_before": count_params(base), "params_after": count_params(base),
            "param_reduction": 0.0, "flop_reduction": 0.0,
            "note": "weights zeroed in place: same shapes, same dense FLOPs and file size, no speed-up"}
