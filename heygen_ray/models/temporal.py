"""Temporal transformer over a sequence of per-frame feature vectors.

Used on its own (frame features precomputed by any image backbone) and inside
`video.FrameVideoClassifier` to model time on top of ViT/Swin frame features.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from heygen_ray.models.base import ModelBase, build, init_weights, new_linear_head, random_tensor
from heygen_ray.models.layers import TransformerBlock, drop_path_rates
from heygen_ray.registry import MODELS


class TemporalTransformer(ModelBase):
    """Transformer over frames: input projection, learned frame positions (+ optional relative
    bias), pre-norm blocks, optionally causal (frame t sees frames <= t only).

    Input: `frame_features` (B, T, input_dimensions), T <= max_frames. forward_features ->
    (B, T, hidden_dimensions); forward -> (B, num_classes), pooled over time: the last frame when
    causal (the only one that has seen the whole clip), else the mean ("pooling" overrides).
    """

    input_names = ("frame_features",)

    def __init__(
        self,
        input_dimensions: int = 512,
        hidden_dimensions: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        max_frames: int = 16,
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        causal: bool = True,
        use_relative_position: bool = False,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
        pooling: Optional[str] = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.pooling = pooling or ("last" if causal else "mean")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.input_dimensions, self.max_frames = input_dimensions, max_frames
        self.num_classes, self.num_features = num_classes, hidden_dimensions
        d = hidden_dimensions
        self.input_proj = nn.Linear(input_dimensions, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_frames, d))
        self.drop = nn.Dropout(dropout_rate)
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, num_attention_heads, feed_forward_dimensions, dropout_rate, rates[i],
                use_relative_position=use_relative_position, max_relative_position=max_frames, causal=causal,
                use_gated_linear=use_gated_linear, activation_function=activation_function,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = new_linear_head(d, num_classes, like=self)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, frame_features: torch.Tensor) -> torch.Tensor:
        t = frame_features.shape[1]
        if t > self.max_frames:
            raise ValueError(f"{t} frames > max_frames {self.max_frames}")
        x = self.drop(self.input_proj(frame_features) + self.pos_embed[:, :t])  # (B, T, D)
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, D)
        return features[:, -1] if self.pooling == "last" else features.mean(dim=1)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        x = self.pool(features)
        return x if pre_logits else self.head(x)

    def forward(self, frame_features: torch.Tensor) -> torch.Tensor:  # (B, T, Din) -> (B, num_classes)
        return self.forward_head(self.forward_features(frame_features))

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        shape = (batch_size, self.max_frames, self.input_dimensions)
        return {"frame_features": random_tensor(shape, self._device())}


@MODELS.register("temporal_transformer_base")
def temporal_transformer_base(**overrides: Any) -> TemporalTransformer:
    """The original design's temporal model: 512-d frame features -> 768 x 12 layers x 12 heads,
    causal, 16 frames; a feature model (num_classes=0: forward returns the 768-d clip feature)."""
    return build(TemporalTransformer, overrides, input_dimensions=512, hidden_dimensions=768, num_layers=12,
                 num_attention_heads=12, max_frames=16, causal=True, num_classes=0)


@MODELS.register("temporal_transformer_micro")
def temporal_transformer_micro(**overrides: Any) -> TemporalTransformer:
    """Tiny causal temporal transformer: 8 frames of 32-d features -> 64 x 2 layers, relative
    position bias, 16 classes."""
    return build(TemporalTransformer, overrides, input_dimensions=32, hidden_dimensions=64, num_layers=2,
                 num_attention_heads=2, max_frames=8, causal=True, use_relative_position=True, num_classes=16)
