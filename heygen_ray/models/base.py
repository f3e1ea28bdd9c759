"""The one interface every model in the zoo implements, and the preset-building helper.

Training, EMA, pruning, distillation and serving only ever talk to a model through `ModelBase`:
keyword inputs named in `input_names`, `forward_features` / `forward_head`, one head that can be
reset, a gradient-checkpointing switch, example inputs and a forward-FLOP estimate. That is what
lets those stages work without a single per-architecture case.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from heygen_ray.registry import MODELS

M = TypeVar("M", bound=nn.Module)


class UnknownArgumentError(TypeError):
    """An override that the model being built does not accept."""


class ModelBase(nn.Module):
    """Base class of every registered model (see the package docstring for the contract).

    Subclasses set `input_names`, `num_classes`, `num_features`, a `head` module, and implement
    `forward` (explicit keyword arguments), `forward_features`, `forward_head` and `example_inputs`.
    Block stacks run through `self.run_block(block, *args)` so `set_grad_checkpointing` works.
    """

    input_names: Tuple[str, ...] = ()  # keyword inputs forward() accepts; required ones first
    num_classes: int  # width of forward()'s last dimension (0 = the head is an identity)
    num_features: int  # width of the pre-logits features that feed the head

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self._flops_cache: Dict[Tuple, int] = {}

    # -- the head ------------------------------------------------------------------------------
    def forward_features(self, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """The output layer that `reset_classifier` replaces."""
        return self.head

    def reset_classifier(self, num_outputs: int) -> None:
        """Replace the head with a freshly initialised one of `num_outputs` outputs (0 = identity)."""
        self.head = new_linear_head(self.num_features, num_outputs, like=self)
        self.num_classes = num_outputs
        self._flops_cache.clear()

    # -- training switches ---------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        for module in self.modules():
            if isinstance(module, ModelBase):
                module.grad_checkpointing = enable

    def run_block(self, block: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """Call one block, through non-reentrant activation checkpointing when it is switched on."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # -- examples and cost ---------------------------------------------------------------------
    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        """Random keyword inputs matching the preset's shapes, on the model's device."""
        raise NotImplementedError

    def flops_per_sample(self, inputs: Optional[Mapping[str, torch.Tensor]] = None) -> int:
        """Forward FLOPs for one sample (2 per multiply-add of matmuls, convolutions and attention).

        Counted with `FlopCounterMode` on meta-device copies of the parameters and inputs, so it
        costs no compute and works for any size. Elementwise ops, norms and softmax are not counted
        (the usual convention, as in the MFU literature); causal attention is counted dense.
        A training step is about 3x this (forward + backward).
        """
        inputs = dict(inputs) if inputs is not None else self.example_inputs(1)
        batch = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
        key = tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items() if isinstance(v, torch.Tensor)))
        if key not in self._flops_cache:
            meta = {name: torch.empty_like(t, device="meta") for name, t in self.named_parameters()}
            meta.update({name: torch.empty_like(t, device="meta") for name, t in self.named_buffers()})
            meta_inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            # counted in eval mode (the forward that serves): a training-mode BatchNorm1d cannot take
            # the one-sample batch this is usually asked about
            modes = {m: m.training for m in self.modules()}
            self.eval()
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    torch.func.functional_call(self, meta, args=(), kwargs=meta_inputs)
            finally:
                for m, training in modes.items():
                    m.training = training
            self._flops_cache[key] = int(counter.get_total_flops())
        return self._flops_cache[key] // batch

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def new_linear_head(in_features: int, num_outputs: int, like: nn.Module, bias: bool = True) -> nn.Module:
    """A Linear head (Identity when num_outputs == 0) on the same device/dtype as `like`."""
    if num_outputs < 0:
        raise ValueError(f"num_outputs must be >= 0, got {num_outputs}")
    if num_outputs == 0:
        return nn.Identity()
    ref = next(like.parameters())
    head = nn.Linear(in_features, num_outputs, bias=bias, device=ref.device, dtype=ref.dtype)
    init_weights(head)
    return head


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the sequence of x (B, L, D), counting only positions where mask (B, L) is True."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def init_weights(module: nn.Module) -> None:
    """ViT-style init (timm's default mode): Linear trunc-normal(0.02) with zero bias, Embedding
    normal(0.02); norms and convolutions keep PyTorch's defaults. Apply with `model.apply`."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def random_token_inputs(
    batch_size: int, length: int, vocab_size: int, device: torch.device, seed: int = 0
) -> Dict[str, torch.Tensor]:
    """Token ids (B, L) and a bool attention mask (B, L) where odd samples are right-padded by L/4."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.bool)
    mask[1::2, length - length // 4 :] = False
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def random_tensor(shape: Tuple[int, ...], device: torch.device, seed: int = 0) -> torch.Tensor:
    """Deterministic standard-normal tensor (generated on CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)


def random_video(shape: Tuple[int, ...], device: torch.device, seed: int = 0) -> torch.Tensor:
    """Deterministic video-like tensor in [-1, 1] (the data pipeline's value range)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).to(device)


def build(cls: Type[M], overrides: Mapping[str, Any], **defaults: Any) -> M:
    """Instantiate `cls(**defaults | overrides)`, rejecting override keys `cls` does not accept."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise UnknownArgumentError(
            f"{cls.__name__} does not accept {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}"
        )
    return cls(**{**defaults, **overrides})


__all__ = [
    "ModelBase",
    "UnknownArgumentError",
    "build",
    "init_weights",
    "masked_mean",
    "new_linear_head",
]


def create_model(name: str, **overrides: Any) -> ModelBase:
    """Build the registered preset `name`, with constructor arguments overridden by `overrides`.

    Unknown names raise `UnknownNameError` (with close matches); override keys the model does not
    accept raise `UnknownArgumentError` (a TypeError) naming the key and the model.
    """
    builder = MODELS.get(name)
    try:
        return builder(**overrides)
    except UnknownArgumentError as e:
        raise UnknownArgumentError(f"create_model({name!r}): {e}") from None
