"""Transformer building blocks shared by every model: attention, feed-forward, the pre-norm block.

All attention runs on `F.scaled_dot_product_attention`. A learned relative position bias, a causal
mask and a key-padding mask are folded into ONE additive float mask (SDPA refuses `attn_mask`
together with `is_causal=True`); masked logits get the dtype's most negative finite value rather
than -inf, so a row with nothing to attend to (a padded query) gives a uniform softmax, not NaN,
while real rows still give exactly zero weight to masked keys.

Masks follow one convention everywhere: bool, True = attend to / a real token.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # exact (erf) GELU, as in BERT/ViT
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # GPT-2's approximation
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
}


def make_activation(name: str) -> nn.Module:
    """Activation module by name: gelu, gelu_tanh, silu (= swish), relu."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation_function {name!r}; choose from {sorted(ACTIVATIONS)}") from None


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic-depth rate per block, rising linearly from 0 to drop_path_rate (as in timm)."""
    return [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `drop_rate`."""

    def __init__(self, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        keep = 1.0 - self.drop_rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        return x * mask / keep


class FeedForwardNetwork(nn.Module):
    """Position-wise MLP: fc1 -> activation -> fc2, or a gated linear unit.

    With `use_gated_linear`, fc1 produces 2 x feed_forward_dimensions and the output is
    value * act(gate) (GEGLU with gelu, SwiGLU with silu; Shazeer 2020), the packed layout timm
    uses. Module names fc1/fc2 match timm's Mlp so ViT/Swin checkpoints load.
    """

    def __init__(
        self,
        embedding_dimensions: int,
        feed_forward_dimensions: int,
        activation_function: str = "gelu",
        use_gated_linear: bool = False,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.use_gated_linear = use_gated_linear
        self.fc1 = nn.Linear(embedding_dimensions, feed_forward_dimensions * (2 if use_gated_linear else 1))
        self.act = make_activation(activation_function)
        self.drop1 = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(feed_forward_dimensions, embedding_dimensions)
        self.drop2 = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        h = self.fc1(x)  # (..., F) or (..., 2F)
        if self.use_gated_linear:
            value, gate = h.chunk(2, dim=-1)
            h = value * self.act(gate)
        else:
            h = self.act(h)
        return self.drop2(self.fc2(self.drop1(h)))


def relative_position_index(query_length: int, key_length: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """(Lq, Lk) index into a (2*max_distance+1)-entry table of clipped offsets key - query.

    Query i is aligned with key i + (Lk - Lq), so with a cache-less decoder (Lq == Lk) the
    diagonal is offset 0 and the last query always lines up with the last key.
    """
    q = torch.arange(query_length, device=device)[:, None] + (key_length - query_length)
    k = torch.arange(key_length, device=device)[None, :]
    return (k - q).clamp(-max_distance, max_distance) + max_distance


def additive_mask(bias: Optional[torch.Tensor], allowed: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Fold a float bias and a bool `allowed` mask (True = attend) into one additive float mask."""
    if allowed is None:
        return bias
    if bias is None:
        bias = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, bias, torch.finfo(dtype).min)


class AttentionMechanism(nn.Module):
    """softmax(q k^T / sqrt(d) + bias) v with optional relative position bias and causal mask.

    The general attention core the projection modules build on: it owns the learned relative
    position bias table (num_heads x (2*max_relative_position + 1), clipped offsets as in
    Shaw et al. 2018 / T5 without buckets) and turns bias + causal + key padding into the single
    float mask SDPA takes. Without bias or padding it uses SDPA's own `is_causal` fast path.
    """

    def __init__(
        self,
        num_attention_heads: int,
        dropout_rate: float = 0.0,
        causal: bool = False,
        use_relative_position: bool = False,
        max_relative_position: int = 128,
    ) -> None:
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.dropout_rate = dropout_rate
        self.causal = causal
        self.use_relative_position = use_relative_position
        self.max_relative_position = max_relative_position
        if use_relative_position:
            table = torch.zeros(num_attention_heads, 2 * max_relative_position + 1)
            self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    def relative_position_bias(self, query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
        """Learned bias (1, H, Lq, Lk) for every query/key pair."""
        index = relative_position_index(query_length, key_length, self.max_relative_position, device)
        return self.relative_position_bias_table[:, index].unsqueeze(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # q: (B, H, Lq, hd); k, v: (B, H, Lk, hd); key_padding_mask: (B, Lk) bool, True = real key
        lq, lk = q.shape[-2], k.shape[-2]
        dropout_p = self.dropout_rate if self.training else 0.0
        bias = self.relative_position_bias(lq, lk, q.device).to(q.dtype) if self.use_relative_position else None
        if bias is None and key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal and lq == lk)
        allowed = None  # bool, broadcastable to (B, H, Lq, Lk)
        if self.causal:
            allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)  # (Lq, Lk)
        if key_padding_mask is not None:
            keys = key_padding_mask[:, None, None, :].bool()  # (B, 1, 1, Lk)
            allowed = keys if allowed is None else allowed & keys
        mask = additive_mask(bias, allowed, q.dtype)  # (B or 1, H or 1, Lq, Lk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MultiHeadCrossAttention(nn.Module):
    """Multi-head self- or cross-attention with projections around an `AttentionMechanism`.

    Self-attention uses one fused `qkv` projection and `proj` (timm's names, so ViT weights load);
    cross-attention (`is_cross_attention=True`) projects queries from x with `q` and keys/values
    from a context of width `context_dimensions` with `kv`.
    """

    def __init__(
        self,
        embedding_dimensions: int,
        num_attention_heads: int,
        dropout_rate: float = 0.0,
        use_relative_position: bool = False,
        max_relative_position: int = 128,
        causal: bool = False,
        is_cross_attention: bool = False,
        context_dimensions: Optional[int] = None,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if embedding_dimensions % num_attention_heads:
            raise ValueError(f"embedding_dimensions {embedding_dimensions} not divisible by {num_attention_heads} heads")
        self.num_attention_heads = num_attention_heads
        self.is_cross_attention = is_cross_attention
        d = embedding_dimensions
        if is_cross_attention:
            self.q = nn.Linear(d, d, bias=qkv_bias)
            self.kv = nn.Linear(context_dimensions or d, 2 * d, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
        self.mechanism = AttentionMechanism(
            num_attention_heads, dropout_rate, causal, use_relative_position, max_relative_position
        )
        self.proj = nn.Linear(d, d)
        self.proj_drop = nn.Dropout(dropout_rate)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # x: (B, L, D); context: (B, M, Dc) for cross-attention; attention_mask: (B, L or M) over keys
        b, seq_len, _ = x.shape
        h = self.num_attention_heads
        if self.is_cross_attention:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self.q(x).view(b, seq_len, h, -1).transpose(1, 2)  # (B, H, L, hd)
            k, v = self.kv(context).view(b, context.shape[1], 2, h, -1).permute(2, 0, 3, 1, 4)  # (B, H, M, hd)
        else:
            # hd from the projection, not from D: structured pruning removes whole heads (H*hd < D)
            q, k, v = self.qkv(x).view(b, seq_len, 3, h, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        y = self.mechanism(q, k, v, key_padding_mask=attention_mask)  # (B, H, L, hd)
        y = y.transpose(1, 2).reshape(b, seq_len, -1)  # (B, L, H*hd)
        return self.proj_drop(self.proj(y))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, feed-forward.

    x = x + attn(norm1(x)); x = x + cross_attn(norm_cross(x), context); x = x + mlp(norm2(x)).
    Names norm1/attn/norm2/mlp match timm's ViT Block.
    """

    def __init__(
        self,
        embedding_dimensions: int,
        num_attention_heads: int,
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_relative_position: bool = False,
        max_relative_position: int = 128,
        causal: bool = False,
        use_cross_attention: bool = False,
        context_dimensions: Optional[int] = None,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        d = embedding_dimensions
        self.use_cross_attention = use_cross_attention
        self.norm1 = nn.LayerNorm(d, eps=norm_eps)
        self.attn = MultiHeadCrossAttention(
            d, num_attention_heads, dropout_rate, use_relative_position, max_relative_position, causal, qkv_bias=qkv_bias
        )
        if use_cross_attention:
            self.norm_cross = nn.LayerNorm(d, eps=norm_eps)
            # the relative bias of cross-attention aligns query i with key i + (M - L) (see
            # relative_position_index): meaningful when the context is a sequence in step with x
            self.cross_attn = MultiHeadCrossAttention(
                d, num_attention_heads, dropout_rate, use_relative_position, max_relative_position,
                is_cross_attention=True, context_dimensions=context_dimensions or d, qkv_bias=qkv_bias,
            )
        self.norm2 = nn.LayerNorm(d, eps=norm_eps)
        self.mlp = FeedForwardNetwork(
            d, feed_forward_dimensions or 4 * d, activation_function, use_gated_linear, dropout_rate
        )
        self.drop_path = DropPath(drop_path_rate)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # x: (B, L, D); attention_mask: (B, L); context: (B, M, Dc); context_mask: (B, M)
        x = x + self.drop_path(self.attn(self.norm1(x), attention_mask=attention_mask))
        if self.use_cross_attention:
            if context is None:
                raise ValueError("this block has cross-attention: pass a context (memory) tensor")
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), context, context_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))
