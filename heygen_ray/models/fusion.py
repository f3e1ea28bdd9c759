"""Fusion of a text sequence with a video sequence.

`MultimodalFusionModule` is one fusion layer; `MultimodalFusion` projects both modalities to a
common width and stacks layers. Every fusion type returns text-aligned features (B, L, D), so the
result can condition the VideoGenerator or be pooled for matching regardless of the type:

- cross_attention: text self-attention, then text queries attend to the video tokens, then FFN.
- concat: one transformer over the concatenated [text; video] sequence (both streams updated;
  a learned modality embedding tells them apart); the text positions are returned.
- gated: like cross_attention, but the attended video summary is mixed into each text token through
  a learned sigmoid gate computed from the token and the summary (gated multimodal unit).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from heygen_ray.models.base import ModelBase, build, init_weights, masked_mean, new_linear_head, random_tensor
from heygen_ray.models.layers import FeedForwardNetwork, MultiHeadCrossAttention, TransformerBlock
from heygen_ray.registry import MODELS

FUSION_TYPES = ("cross_attention", "concat", "gated")


class MultimodalFusionModule(nn.Module):
    """One fusion layer on already-projected text (B, L, D) and video (B, N, D) tokens.

    forward(text, video, text_mask=None, video_mask=None) -> (text', video'); video' is the input
    unchanged except for fusion_type="concat".
    """

    def __init__(
        self,
        embedding_dimensions: int,
        num_attention_heads: int,
        fusion_type: str = "cross_attention",
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
    ) -> None:
        super().__init__()
        if fusion_type not in FUSION_TYPES:
            raise ValueError(f"fusion_type must be one of {FUSION_TYPES}, got {fusion_type!r}")
        self.fusion_type = fusion_type
        d = embedding_dimensions
        ffn = dict(feed_forward_dimensions=feed_forward_dimensions, dropout_rate=dropout_rate,
                   use_gated_linear=use_gated_linear, activation_function=activation_function)
        if fusion_type == "cross_attention":
            self.block = TransformerBlock(d, num_attention_heads, use_cross_attention=True, **ffn)
        elif fusion_type == "concat":
            self.block = TransformerBlock(d, num_attention_heads, **ffn)
        else:  # gated
            self.norm1 = nn.LayerNorm(d)
            self.attn = MultiHeadCrossAttention(d, num_attention_heads, dropout_rate)
            self.norm_cross = nn.LayerNorm(d)
            self.cross_attn = MultiHeadCrossAttention(d, num_attention_heads, dropout_rate, is_cross_attention=True)
            self.gate = nn.Linear(2 * d, d)
            self.norm2 = nn.LayerNorm(d)
            self.mlp = FeedForwardNetwork(d, feed_forward_dimensions or 4 * d, activation_function,
                                          use_gated_linear, dropout_rate)

    def forward(
        self,
        text: torch.Tensor,
        video: torch.Tensor,
        text_mask: Optional[torch.Tensor] = None,
        video_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        # text: (B, L, D), video: (B, N, D), masks: (B, L) / (B, N) bool, True = real token
        if self.fusion_type == "cross_attention":
            return self.block(text, text_mask, video, video_mask), video
        if self.fusion_type == "concat":
            length = text.shape[1]
            mask = None
            if text_mask is not None or video_mask is not None:
                mask = torch.cat([_ones_if_none(text_mask, text), _ones_if_none(video_mask, video)], dim=1)
            joint = self.block(torch.cat([text, video], dim=1), mask)  # (B, L + N, D)
            return joint[:, :length], joint[:, length:]
        x = text + self.attn(self.norm1(text), attention_mask=text_mask)
        q = self.norm_cross(x)
        attended = self.cross_attn(q, video, video_mask)  # (B, L, D)
        g = torch.sigmoid(self.gate(torch.cat([q, attended], dim=-1)))  # (B, L, D), per-feature gate
        x = x + g * attended
        return x + self.mlp(self.norm2(x)), video


def _ones_if_none(mask: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return mask.bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


class MultimodalFusion(ModelBase):
    """Fuse text embeddings (B, L, text_dimensions) with video embeddings (B, N, video_dimensions).

    forward(text_embeddings, video_embeddings, attention_mask=None, video_mask=None) ->
    (B, num_classes) from the masked mean over text positions ((B, D) when num_classes == 0,
    e.g. num_classes=1 for a match score). forward_features -> fused text-aligned (B, L, D).
    `text_sequence_length` / `video_sequence_length` only size example_inputs and the FLOP estimate.
    """

    input_names = ("text_embeddings", "video_embeddings", "attention_mask", "video_mask")

    def __init__(
        self,
        text_dimensions: int = 768,
        video_dimensions: int = 512,
        hidden_dimensions: int = 768,
        num_layers: int = 6,
        fusion_type: str = "cross_attention",
        num_attention_heads: Optional[int] = None,
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
        num_classes: int = 0,
        text_sequence_length: int = 64,
        video_sequence_length: int = 16,
    ) -> None:
        super().__init__()
        d = hidden_dimensions
        self.text_dimensions, self.video_dimensions, self.fusion_type = text_dimensions, video_dimensions, fusion_type
        self.text_sequence_length, self.video_sequence_length = text_sequence_length, video_sequence_length
        self.num_classes, self.num_features = num_classes, d
        self.text_proj = nn.Linear(text_dimensions, d)
        self.video_proj = nn.Linear(video_dimensions, d)
        # modality embedding: only concat fusion mixes both streams in one sequence
        self.type_embed = nn.Parameter(torch.zeros(2, d)) if fusion_type == "concat" else None
        self.layers = nn.ModuleList(
            MultimodalFusionModule(d, num_attention_heads or max(1, d // 64), fusion_type, feed_forward_dimensions,
                                   dropout_rate, use_gated_linear, activation_function)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = new_linear_head(d, num_classes, like=self)
        self.apply(init_weights)
        if self.type_embed is not None:
            nn.init.trunc_normal_(self.type_embed, std=0.02)

    def forward_features(
        self,
        text_embeddings: torch.Tensor,
        video_embeddings: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        video_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        text = self.text_proj(text_embeddings)  # (B, L, D)
        video = self.video_proj(video_embeddings)  # (B, N, D)
        if self.type_embed is not None:
            text, video = text + self.type_embed[0], video + self.type_embed[1]
        for layer in self.layers:
            text, video = self.run_block(layer, text, video, attention_mask, video_mask)
        return self.norm(text)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        x = masked_mean(features, attention_mask)  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(
        self,
        text_embeddings: torch.Tensor,
        video_embeddings: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        video_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        features = self.forward_features(text_embeddings, video_embeddings, attention_mask, video_mask)
        return self.forward_head(features, attention_mask)

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        device = self._device()
        lt, lv = self.text_sequence_length, self.video_sequence_length
        mask = torch.ones(batch_size, lt, dtype=torch.bool)
        mask[1::2, lt - lt // 4 :] = False
        return {
            "text_embeddings": random_tensor((batch_size, lt, self.text_dimensions), device, seed=0),
            "video_embeddings": random_tensor((batch_size, lv, self.video_dimensions), device, seed=1),
            "attention_mask": mask.to(device),
        }


@MODELS.register("multimodal_fusion_base")
def multimodal_fusion_base(**overrides: Any) -> MultimodalFusion:
    """The original design's fusion: text 768 + video 512 -> 768 x 6 layers, cross attention, 12 heads
    (examples: 512 text tokens, 16 per-frame video features)."""
    return build(MultimodalFusion, overrides, text_dimensions=768, video_dimensions=512, hidden_dimensions=768,
                 num_layers=6, fusion_type="cross_attention", num_attention_heads=12,
                 text_sequence_length=512, video_sequence_length=16)


@MODELS.register("multimodal_fusion_micro")
def multimodal_fusion_micro(**overrides: Any) -> MultimodalFusion:
    """Tiny fusion: text 64 + video 32 -> 64 x 2 layers, cross attention (examples: 16 text tokens,
    8 video tokens)."""
    return build(MultimodalFusion, overrides, text_dimensions=64, video_dimensions=32, hidden_dimensions=64,
                 num_layers=2, fusion_type="cross_attention", num_attention_heads=2, feed_forward_dimensions=128,
                 text_sequence_length=16, video_sequence_length=8)
