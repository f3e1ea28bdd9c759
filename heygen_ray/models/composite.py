"""Composite models for the multimodal tasks, built from the zoo's parts (one ModelBase each, so
training, EMA, checkpoints and logging treat them like any other model).

`TextToVideo`: TextProcessor -> MultimodalFusion -> VideoGenerator (the design's text-to-video chain).
The fusion lets caption tokens attend to a small set of learned "video prior" tokens before they
condition the generator. forward(input_ids, attention_mask) -> video (B, C, T, H, W) in [-1, 1].

"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from heygen_ray.models.base import ModelBase, build, random_token_inputs
from heygen_ray.models.fusion import MultimodalFusion
from heygen_ray.models.generator import VideoGenerator
from heygen_ray.models.text import TextProcessor
from heygen_ray.registry import MODELS


class TextToVideo(ModelBase):
    input_names = ("input_ids", "attention_mask")

    def __init__(
        self,
        vocab_size: int = 512,
        max_sequence_length: int = 32,
        text_dimensions: int = 64,
        text_layers: int = 2,
        fusion_dimensions: int = 64,
        fusion_layers: int = 1,
        fusion_type: str = "cross_attention",
        video_prior_tokens: int = 8,
        generator_dimensions: int = 96,
        generator_layers: int = 3,
        num_attention_heads: int = 2,
        video_channels: int = 3,
        video_height: int = 32,
        video_width: int = 32,
        max_frames: int = 8,
        patch_size: int = 8,
        tubelet_size: int = 2,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.max_sequence_length = max_sequence_length
        self.text = TextProcessor(vocab_size=vocab_size, hidden_dimensions=text_dimensions, num_layers=text_layers,
                                  num_attention_heads=num_attention_heads, max_sequence_length=max_sequence_length,
                                  dropout_rate=dropout_rate)
        self.video_prior = nn.Parameter(torch.randn(1, video_prior_tokens, fusion_dimensions) * 0.02)
        self.fusion = MultimodalFusion(text_dimensions=text_dimensions, video_dimensions=fusion_dimensions,
                                       hidden_dimensions=fusion_dimensions, num_layers=fusion_layers,
                                       fusion_type=fusion_type, num_attention_heads=num_attention_heads,
                                       dropout_rate=dropout_rate)
        self.generator = VideoGenerator(input_dimensions=fusion_dimensions, hidden_dimensions=generator_dimensions,
                                        num_layers=generator_layers, num_attention_heads=num_attention_heads,
                                        video_channels=video_channels, video_height=video_height,
                                        video_width=video_width, max_frames=max_frames, patch_size=patch_size,
                                        tubelet_size=tubelet_size, dropout_rate=dropout_rate)
        # No `self.head` alias of generator.head: a module registered under two names breaks
        # torch.func.functional_call (used for the FLOP count), which then restores only one of them.
        self.num_classes, self.num_features = video_channels, generator_dimensions

    def condition(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = self.text.forward_features(input_ids, attention_mask)  # (B, L, Dt)
        prior = self.video_prior.expand(input_ids.shape[0], -1, -1)  # (B, P, Df)
        return self.fusion.forward_features(tokens, prior, attention_mask)  # (B, L, Df)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.generator.forward_features(self.condition(input_ids, attention_mask), attention_mask)

    def forward_head(self, features, attention_mask=None, pre_logits: bool = False) -> torch.Tensor:
        return self.generator.forward_head(features, attention_mask, pre_logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, attention_mask), attention_mask)

    def get_classifier(self) -> nn.Module:
        return self.generator.head

    def reset_classifier(self, num_outputs: int) -> None:
        self.generator.reset_classifier(num_outputs)
        self.num_classes = num_outputs
        self._flops_cache.clear()

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        return random_token_inputs(batch_size, min(16, self.max_sequence_length), self.text.vocab_size, self._device())


@MODELS.register("text_to_video_micro")
def text_to_video_micro(**overrides: Any) -> TextToVideo:
    """Tiny text-to-video chain for 8 x 32 x 32 clips: text 64 x 2, fusion 64 x 1, generator 96 x 3."""
    return build(TextToVideo, overrides)


@MODELS.register("text_to_video_base")
def text_to_video_base(**overrides: Any) -> TextToVideo:
    """The design's sizes chained: text 768 x 12, fusion 768/512 -> 512, generator 768 x 12 for 16 x 224 x 224."""
    return build(TextToVideo, overrides, vocab_size=50000, max_sequence_length=512, text_dimensions=768, text_layers=12,
                 fusion_dimensions=512, fusion_layers=6, generator_dimensions=768, generator_layers=12,
                 num_attention_heads=12, video_height=224, video_width=224, max_frames=16, patch_size=16, tubelet_size=2)
