"""Text-conditioned video generator: a transformer over space-time patch tokens.

Every output patch (tubelet x patch x patch pixels of every channel) is one token. The tokens start
as learned space-time position embeddings, attend to each other (self-attention) and to the
projected text conditioning (cross-attention), and a linear head maps each token to its pixels.
With ``caption_modulation`` every block's input is also scaled and shifted per channel by a linear map
of the pooled conditioning (FiLM): the tokens then differ between captions from the first step, where
cross-attention alone starts near zero and was measured to leave the model stuck on the mean clip.

Output layout: the original design describes one sample as T x C x H x W; this model returns
(B, C, T, H, W), the same layout as every video encoder's input, the losses and the data
pipeline, with values in [-1, 1] (tanh).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from heygen_ray.models.base import ModelBase, build, init_weights, masked_mean, random_tensor
from heygen_ray.models.layers import TransformerBlock, drop_path_rates
from heygen_ray.registry import MODELS


class VideoGenerator(ModelBase):
    """Generate a video from text embeddings.

    forward(text_embeddings, attention_mask=None) -> video (B, video_channels, max_frames,
    video_height, video_width) in [-1, 1]. `text_embeddings` is (B, L, input_dimensions) (e.g.
    TextProcessor or MultimodalFusion features) or a pooled (B, input_dimensions).
    forward_features -> patch tokens (B, N, hidden_dimensions). The "head" is the output patch
    projection: reset_classifier(n) re-initialises it to produce n video channels.
    """

    input_names = ("text_embeddings", "attention_mask")

    def __init__(
        self,
        input_dimensions: int = 512,
        hidden_dimensions: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        video_channels: int = 3,
        video_height: int = 224,
        video_width: int = 224,
        max_frames: int = 16,
        patch_size: int = 16,
        tubelet_size: int = 2,
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
        text_sequence_length: int = 64,
        caption_modulation: bool = False,
    ) -> None:
        super().__init__()
        if video_height % patch_size or video_width % patch_size or max_frames % tubelet_size:
            raise ValueError("video_height/video_width/max_frames must be multiples of patch_size/tubelet_size")
        self.input_dimensions, self.video_channels = input_dimensions, video_channels
        self.video_height, self.video_width, self.max_frames = video_height, video_width, max_frames
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.text_sequence_length = text_sequence_length  # example_inputs / FLOP estimate only
        self.grid = (max_frames // tubelet_size, video_height // patch_size, video_width // patch_size)  # (T', H', W')
        self.num_features = d = hidden_dimensions
        self.num_classes = video_channels
        self.text_proj = nn.Linear(input_dimensions, d)
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.grid[0], 1, d))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, 1, self.grid[1] * self.grid[2], d))
        self.drop = nn.Dropout(dropout_rate)
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, num_attention_heads, feed_forward_dimensions, dropout_rate, rates[i], use_cross_attention=True,
                use_gated_linear=use_gated_linear, activation_function=activation_function,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, video_channels * tubelet_size * patch_size**2)
        # FiLM: per block, (shift, scale) from the masked mean of the conditioning
        self.modulation = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(num_layers)) if caption_modulation else None
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed_temporal, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_spatial, std=0.02)

    def reset_classifier(self, num_outputs: int) -> None:
        """Re-initialise the output patch projection for `num_outputs` video channels (> 0)."""
        if num_outputs <= 0:
            raise ValueError("a video generator needs at least one output channel")
        ref = self.head.weight
        self.head = nn.Linear(self.num_features, num_outputs * self.tubelet_size * self.patch_size**2,
                              device=ref.device, dtype=ref.dtype)
        init_weights(self.head)
        self.video_channels = self.num_classes = num_outputs
        self._flops_cache.clear()

    def forward_features(self, text_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if text_embeddings.ndim == 2:  # pooled conditioning (B, Din) -> a sequence of one
            text_embeddings = text_embeddings.unsqueeze(1)
        context = self.text_proj(text_embeddings)  # (B, L, D)
        b, d = context.shape[0], self.num_features
        x = (self.pos_embed_temporal + self.pos_embed_spatial).reshape(1, -1, d)  # (1, N, D) space-time queries
        x = self.drop(x.expand(b, -1, -1))
        pooled = masked_mean(context, attention_mask) if self.modulation is not None else None  # (B, D)
        for i, block in enumerate(self.blocks):
            if self.modulation is not None:
                shift, scale = self.modulation[i](pooled).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
                x = x * (1 + scale) + shift
            x = self.run_block(block, x, None, context, attention_mask)
        return self.norm(x)  # (B, N, D)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        if pre_logits:
            return features
        patches = self.head(features)  # (B, N, C * tt * p * p)
        return torch.tanh(self.unpatchify(patches))

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T' * H' * W', C * tt * p * p) -> (B, C, T, H, W)."""
        b = patches.shape[0]
        t, h, w = self.grid
        tt, p, c = self.tubelet_size, self.patch_size, self.video_channels
        x = patches.view(b, t, h, w, c, tt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', tt, H', p, W', p)
        return x.reshape(b, c, t * tt, h * p, w * p)

    def forward(self, text_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(text_embeddings, attention_mask))

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        device, length = self._device(), self.text_sequence_length
        mask = torch.ones(batch_size, length, dtype=torch.bool)
        mask[1::2, length - length // 4 :] = False
        return {
            "text_embeddings": random_tensor((batch_size, length, self.input_dimensions), device),
            "attention_mask": mask.to(device),
        }


@MODELS.register("video_generator_base")
def video_generator_base(**overrides: Any) -> VideoGenerator:
    """The original design's generator: 512-d text conditioning -> 768 x 12 layers x 12 heads,
    16 frames of 3 x 224 x 224 (tubelet 2 x 16 x 16: 1568 patch tokens)."""
    return build(VideoGenerator, overrides, input_dimensions=512, hidden_dimensions=768, num_layers=12,
                 num_attention_heads=12, video_channels=3, video_height=224, video_width=224, max_frames=16,
                 patch_size=16, tubelet_size=2, text_sequence_length=64)


@MODELS.register("video_generator_micro")
def video_generator_micro(**overrides: Any) -> VideoGenerator:
    """Tiny generator: 64-d conditioning (16 tokens) -> 64 x 2 layers, 8 frames of 3 x 32 x 32
    (tubelet 2 x 8 x 8: 64 patch tokens)."""
    return build(VideoGenerator, overrides, input_dimensions=64, hidden_dimensions=64, num_layers=2,
                 num_attention_heads=2, video_channels=3, video_height=32, video_width=32, max_frames=8,
                 patch_size=8, tubelet_size=2, feed_forward_dimensions=128, text_sequence_length=16)
