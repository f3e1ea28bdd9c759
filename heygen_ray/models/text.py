"""Text models. Inputs: `input_ids` int64 (B, L) and optional bool `attention_mask` (B, L),
True = real token; padding is masked out of attention (as keys) and of pooling.

- TextTransformerDecoder: causal language model, optional cross-attention to a memory
  (video or text features).
- TextProcessor: bidirectional text encoder (the conditioning path of text-to-video and the text
  tower of video-text matching).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from heygen_ray.models.base import (
    ModelBase,
    build,
    init_weights,
    masked_mean,
    new_linear_head,
    random_tensor,
    random_token_inputs,
)
from heygen_ray.models.layers import TransformerBlock, drop_path_rates
from heygen_ray.registry import MODELS


class TextEmbedding(nn.Module):
    """Token embedding plus learned absolute positions (omitted when relative positions are used)."""

    def __init__(self, vocab_size: int, dimensions: int, max_sequence_length: int, absolute_positions: bool) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dimensions)
        self.position_embedding = nn.Embedding(max_sequence_length, dimensions) if absolute_positions else None
        self.max_sequence_length = max_sequence_length

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        length = input_ids.shape[1]
        if length > self.max_sequence_length:
            raise ValueError(f"sequence of {length} tokens > max_sequence_length {self.max_sequence_length}")
        x = self.token_embedding(input_ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(length, device=input_ids.device))
        return x


class TextTransformerDecoder(ModelBase):
    """Decoder-only causal language model (pre-norm, GPT-style), with a learned relative position
    bias by default and optional cross-attention to `memory` (B, M, memory_dimensions).

    forward(input_ids, attention_mask=None, memory=None, memory_mask=None) -> logits (B, L, vocab);
    position t only ever sees tokens <= t. forward_features -> (B, L, D). The "head" is the
    vocabulary projection (reset_classifier(n) makes it n-way).
    """

    input_names = ("input_ids", "attention_mask", "memory", "memory_mask")

    def __init__(
        self,
        vocab_size: int = 50000,
        hidden_dimensions: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        max_sequence_length: int = 512,
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_relative_position: bool = True,
        max_relative_position: int = 128,
        use_cross_attention: bool = False,
        memory_dimensions: Optional[int] = None,
        memory_length: int = 16,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
    ) -> None:
        super().__init__()
        self.vocab_size, self.max_sequence_length = vocab_size, max_sequence_length
        self.use_cross_attention = use_cross_attention
        self.memory_dimensions = memory_dimensions or hidden_dimensions
        self.memory_length = memory_length  # example_inputs / FLOP estimate only; any length works
        self.num_classes, self.num_features = vocab_size, hidden_dimensions
        d = hidden_dimensions
        self.embed = TextEmbedding(vocab_size, d, max_sequence_length, absolute_positions=not use_relative_position)
        self.drop = nn.Dropout(dropout_rate)
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, num_attention_heads, feed_forward_dimensions, dropout_rate, rates[i],
                use_relative_position=use_relative_position, max_relative_position=max_relative_position,
                causal=True, use_cross_attention=use_cross_attention, context_dimensions=self.memory_dimensions,
                use_gated_linear=use_gated_linear, activation_function=activation_function,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = new_linear_head(d, vocab_size, like=self, bias=False)
        self.apply(init_weights)

    def reset_classifier(self, num_outputs: int) -> None:
        self.head = new_linear_head(self.num_features, num_outputs, like=self, bias=False)
        self.num_classes = num_outputs
        self._flops_cache.clear()

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        memory: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.use_cross_attention and memory is None:
            raise ValueError("this decoder has cross-attention: pass memory (B, M, memory_dimensions)")
        x = self.drop(self.embed(input_ids))  # (B, L, D)
        for block in self.blocks:
            x = self.run_block(block, x, attention_mask, memory, memory_mask)
        return self.norm(x)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        return features if pre_logits else self.head(features)  # (B, L, vocab)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        memory: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, attention_mask, memory, memory_mask))

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        device = self._device()
        inputs = random_token_inputs(batch_size, self.max_sequence_length, self.vocab_size, device)
        if self.use_cross_attention:
            inputs["memory"] = random_tensor((batch_size, self.memory_length, self.memory_dimensions), device, seed=1)
            inputs["memory_mask"] = torch.ones(batch_size, self.memory_length, dtype=torch.bool, device=device)
        return inputs


class TextProcessor(ModelBase):
    """Bidirectional transformer text encoder (BERT-style, pre-norm).

    forward(input_ids, attention_mask=None) -> (B, num_classes) from the masked mean of the token
    states; with num_classes == 0 (the default) that is the (B, D) sentence embedding.
    forward_features -> (B, L, D) token states: the conditioning sequence for MultimodalFusion and
    VideoGenerator.
    """

    input_names = ("input_ids", "attention_mask")

    def __init__(
        self,
        vocab_size: int = 50000,
        hidden_dimensions: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        max_sequence_length: int = 512,
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_relative_position: bool = False,
        max_relative_position: int = 128,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.max_sequence_length = vocab_size, max_sequence_length
        self.num_classes, self.num_features = num_classes, hidden_dimensions
        d = hidden_dimensions
        self.embed = TextEmbedding(vocab_size, d, max_sequence_length, absolute_positions=not use_relative_position)
        self.drop = nn.Dropout(dropout_rate)
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, num_attention_heads, feed_forward_dimensions, dropout_rate, rates[i],
                use_relative_position=use_relative_position, max_relative_position=max_relative_position,
                use_gated_linear=use_gated_linear, activation_function=activation_function,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = new_linear_head(d, num_classes, like=self)
        self.apply(init_weights)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.drop(self.embed(input_ids))  # (B, L, D)
        for block in self.blocks:
            x = self.run_block(block, x, attention_mask)
        return self.norm(x)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        x = masked_mean(features, attention_mask)  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, attention_mask), attention_mask)

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        return random_token_inputs(batch_size, self.max_sequence_length, self.vocab_size, self._device())


# -- presets ---------------------------------------------------------------------------------------
@MODELS.register("text_decoder_base")
def text_decoder_base(**overrides: Any) -> TextTransformerDecoder:
    """GPT-2-small-sized causal LM: 50 000 vocabulary, 768 x 12 layers x 12 heads, 512 tokens."""
    return build(TextTransformerDecoder, overrides, vocab_size=50000, hidden_dimensions=768, num_layers=12,
                 num_attention_heads=12, max_sequence_length=512)


@MODELS.register("text_decoder_micro")
def text_decoder_micro(**overrides: Any) -> TextTransformerDecoder:
    """Tiny causal LM: 512 vocabulary, 64 tokens, 64 x 2 layers, relative positions, SwiGLU."""
    return build(TextTransformerDecoder, overrides, vocab_size=512, hidden_dimensions=64, num_layers=2,
                 num_attention_heads=2, max_sequence_length=64, feed_forward_dimensions=128,
                 use_gated_linear=True, activation_function="silu", max_relative_position=32)


@MODELS.register("text_processor_base")
def text_processor_base(**overrides: Any) -> TextProcessor:
    """The original design's text processor: 50 000 vocabulary, 768 x 12 layers x 12 heads, 512 tokens."""
    return build(TextProcessor, overrides, vocab_size=50000, hidden_dimensions=768, num_layers=12,
                 num_attention_heads=12, max_sequence_length=512)


@MODELS.register("text_processor_micro")
def text_processor_micro(**overrides: Any) -> TextProcessor:
    """Tiny text encoder: 512 vocabulary, 64 tokens, 64 x 2 layers (returns the 64-d embedding)."""
    return build(TextProcessor, overrides, vocab_size=512, hidden_dimensions=64, num_layers=2,
                 num_attention_heads=2, max_sequence_length=64, feed_forward_dimensions=128)
