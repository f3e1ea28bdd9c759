"""Text-conditioned video generators: a transformer over space-time patch tokens (`VideoGenerator`),
a convolutional decoder run frame by frame (`ConvVideoGenerator`), and a layered one, a background
plus a sprite moved along a trajectory (`SpriteVideoGenerator`).

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
import torch.nn.functional as F
from torch import nn

from heygen_ray.models.base import ModelBase, build, init_weights, masked_mean, random_tensor
from heygen_ray.models.cnn import FiLMUpsample
from heygen_ray.models.layers import TransformerBlock, drop_path_rates
from heygen_ray.registry import MODELS


class _TextToClip(ModelBase):
    """What the generators share: (text embeddings, mask) -> clip, and example inputs of that shape
    (the subclass sets text_sequence_length and input_dimensions)."""

    text_sequence_length: int
    input_dimensions: int

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


class VideoGenerator(_TextToClip):
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



class ConvVideoGenerator(_TextToClip):
    """Generate a video frame by frame with a transposed-convolution decoder (DCGAN-style).

    The pooled conditioning (masked mean of `text_embeddings` (B, L, Din), or a pooled (B, Din)) and a
    learned embedding of the frame index go through an MLP to one vector per frame c_t; a linear map
    of c_t makes a small seed map, and each stage doubles its size (ConvTranspose2d 4x4, stride 2)
    with BatchNorm and a FiLM scale/shift from c_t; a last transposed convolution gives the pixels.
    Convolutions are translation-equivariant, so once the decoder can draw a shape it can draw it
    anywhere: measured on the embedded set it placed the caption's object in the right region,
    colour and motion within 1,000 steps where the patch-token transformer was still drawing the
    mean background.

    forward(text_embeddings, attention_mask=None) -> video (B, video_channels, max_frames, H, W) in
    [-1, 1]. forward_features -> the last hidden maps (B*T, C, H/2, W/2); the "head" is the output
    transposed convolution (reset_classifier(n): n video channels).
    """

    input_names = ("text_embeddings", "attention_mask")

    def __init__(
        self,
        input_dimensions: int = 128,
        conditioning_dimensions: int = 128,
        stage_channels: tuple = (48, 32, 16),
        video_channels: int = 3,
        video_height: int = 32,
        video_width: int = 32,
        max_frames: int = 8,
        text_sequence_length: int = 16,
    ) -> None:
        super().__init__()
        up = 2 ** len(stage_channels)  # the stages' upsamplings, the output layer's included
        if video_height % up or video_width % up:
            raise ValueError(f"video_height/video_width must be multiples of {up} (2 ** len(stage_channels))")
        self.input_dimensions, self.video_channels, self.max_frames = input_dimensions, video_channels, max_frames
        self.video_height, self.video_width = video_height, video_width
        self.text_sequence_length = text_sequence_length  # example_inputs / FLOP estimate only
        self.seed_shape = (stage_channels[0], video_height // up, video_width // up)
        d = conditioning_dimensions
        self.frame_embed = nn.Embedding(max_frames, d)
        self.input_proj = nn.Linear(input_dimensions, d)
        self.condition = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d), nn.ReLU())
        self.seed = nn.Linear(d, stage_channels[0] * self.seed_shape[1] * self.seed_shape[2])
        self.stages = nn.ModuleList(FiLMUpsample(stage_channels[i], stage_channels[i + 1], d)
                                    for i in range(len(stage_channels) - 1))
        self.num_features, self.num_classes = stage_channels[-1], video_channels
        self.head = nn.ConvTranspose2d(stage_channels[-1], video_channels, 4, stride=2, padding=1)

    def reset_classifier(self, num_outputs: int) -> None:
        """A fresh output layer for `num_outputs` video channels (> 0)."""
        if num_outputs <= 0:
            raise ValueError("a video generator needs at least one output channel")
        ref = self.head.weight
        self.head = nn.ConvTranspose2d(self.num_features, num_outputs, 4, stride=2, padding=1, device=ref.device, dtype=ref.dtype)
        self.video_channels = self.num_classes = num_outputs
        self._flops_cache.clear()

    def frame_conditioning(self, text_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, Din) or (B, Din) -> one conditioning vector per frame (B*T, D), frames of a clip together."""
        pooled = text_embeddings if text_embeddings.ndim == 2 else masked_mean(text_embeddings, attention_mask)
        b, t = pooled.shape[0], self.max_frames
        c = self.input_proj(pooled)[:, None].expand(b, t, -1)  # (B, T, D)
        frames = self.frame_embed.weight[None].expand(b, t, -1)
        return self.condition(torch.cat([c, frames], dim=-1).reshape(b * t, -1))

    def forward_features(self, text_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.frame_conditioning(text_embeddings, attention_mask)  # (B*T, D)
        x = self.seed(c).view(c.shape[0], *self.seed_shape)  # (B*T, C0, h0, w0)
        for stage in self.stages:
            x = self.run_block(stage, x, c)
        return x  # (B*T, C, H/2, W/2)

    def forward_head(self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return features
        frames = torch.tanh(self.head(features))  # (B*T, C, H, W)
        bt, c, h, w = frames.shape
        return frames.view(bt // self.max_frames, self.max_frames, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


class SpriteLayers(nn.Module):
    """The pixel-making layers of `SpriteVideoGenerator` (its head): from the caption features, a
    background (a coarse ``grid`` x ``grid`` image, bilinearly upsampled) and one sprite (colour and
    opacity, ``sprite_size`` pixels square, from a hidden layer twice the features' width) that is
    pasted at each frame's point of the trajectory.

    forward(features (B, F), trajectory (B, T, 2)) -> video (B, C, T, H, W) in [-1, 1]: each frame
    is background * (1 - alpha) + sprite colour * alpha, with the sprite resampled (bilinear) around
    its point, so the point is differentiable."""

    def __init__(self, features: int, channels: int, sprite_size: int, grid: int, height: int, width: int) -> None:
        super().__init__()
        self.channels, self.sprite_size, self.grid, self.height, self.width = channels, sprite_size, grid, height, width
        self.background = nn.Linear(features, channels * grid * grid)
        self.sprite = nn.Sequential(nn.Linear(features, 2 * features), nn.ReLU(),
                                    nn.Linear(2 * features, (channels + 1) * sprite_size * sprite_size))

    def forward(self, features: torch.Tensor, trajectory: torch.Tensor) -> torch.Tensor:
        b, t = trajectory.shape[:2]
        c, s, h, w = self.channels, self.sprite_size, self.height, self.width
        background = self.background(features).view(b, c, self.grid, self.grid)
        background = torch.tanh(F.interpolate(background, size=(h, w), mode="bilinear", align_corners=False))
        sprite = self.sprite(features).view(b, c + 1, s, s)
        # opacity starts near 0.1 everywhere: the sprite is visible (it gets gradients) but faint
        layer = torch.cat([torch.tanh(sprite[:, :c]), torch.sigmoid(sprite[:, c:] - 2.0)], dim=1)  # (B, C+1, s, s)
        # output pixel u (normalised) samples the sprite at (u - point) * frame / sprite
        theta = trajectory.new_zeros(b * t, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = w / s, h / s
        theta[:, :, 2] = -trajectory.reshape(b * t, 2) * trajectory.new_tensor([w / s, h / s])
        grid = F.affine_grid(theta, [b * t, c + 1, h, w], align_corners=False)
        layer = layer[:, None].expand(b, t, c + 1, s, s).reshape(b * t, c + 1, s, s)
        placed = F.grid_sample(layer, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        placed = placed.view(b, t, c + 1, h, w).transpose(1, 2)  # (B, C+1, T, H, W)
        alpha = placed[:, c:]
        return background[:, :, None] * (1.0 - alpha) + placed[:, :c] * alpha


class SpriteVideoGenerator(_TextToClip):
    """Generate a video as layers: a background and one sprite that moves along a trajectory.

    The pooled conditioning (as in `ConvVideoGenerator`) goes through an MLP to the caption features
    (B, F); from them a trajectory MLP gives the sprite's point in every frame (normalised (x, y) in
    [-1, 1], with a learned embedding of the frame index), and the head (`SpriteLayers`) draws the
    background and the sprite. The object's shape lives in the sprite's own frame, apart from where it
    is: a loss that forgives the place the caption leaves open (VideoGenerationLoss with an aligned
    pixel term anchored on the trajectory) then lets the sprite be drawn sharp. Measured on the
    embedded set: a classifier named the shape of the generated clips in 96-98 % of held-out captions
    after 1,600 steps, where a convolutional decoder trained on the same loss drew blobs (chance).

    forward(text_embeddings, attention_mask=None, return_trajectory=False) -> video (B,
    video_channels, max_frames, H, W) in [-1, 1] (with ``return_trajectory``: (video, trajectory
    (B, max_frames, 2))). forward_features -> the caption features (B, F); the head is `SpriteLayers`
    (reset_classifier(n): n video channels).
    """

    input_names = ("text_embeddings", "attention_mask")

    def __init__(
        self,
        input_dimensions: int = 128,
        conditioning_dimensions: int = 128,
        sprite_size: Optional[int] = None,
        background_grid: int = 4,
        video_channels: int = 3,
        video_height: int = 32,
        video_width: int = 32,
        max_frames: int = 8,
        text_sequence_length: int = 16,
        pooling_queries: int = 0,
    ) -> None:
        super().__init__()
        sprite_size = max(video_height, video_width) // 2 if sprite_size is None else sprite_size
        if not 1 <= sprite_size <= max(video_height, video_width) or background_grid < 1:
            raise ValueError("sprite_size must be in 1..max(video_height, video_width) and background_grid >= 1")
        self.input_dimensions, self.video_channels, self.max_frames = input_dimensions, video_channels, max_frames
        self.video_height, self.video_width = video_height, video_width
        self.sprite_size, self.background_grid = sprite_size, background_grid
        self.text_sequence_length = text_sequence_length  # example_inputs / FLOP estimate only
        d = conditioning_dimensions
        self.num_features, self.num_classes = d, video_channels
        # token embeddings (B, L, Din) are pooled by a mean, or with pooling_queries > 0 by that many
        # learned queries, each a softmax over the tokens (one can pick the shape word, another the colour)
        self.pooling_queries = pooling_queries
        self.queries = nn.Parameter(torch.randn(pooling_queries, input_dimensions) * input_dimensions**-0.5) if pooling_queries else None
        self.condition = nn.Sequential(nn.Linear(input_dimensions * max(1, pooling_queries), d), nn.ReLU(),
                                       nn.Linear(d, d), nn.ReLU())
        self.frame_embed = nn.Embedding(max_frames, d)
        self.trajectory = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, 2))
        self.head = SpriteLayers(d, video_channels, sprite_size, background_grid, video_height, video_width)
        nn.init.normal_(self.trajectory[-1].weight, std=1e-3)  # every path starts (nearly) still, at the centre
        nn.init.zeros_(self.trajectory[-1].bias)
        # otherwise PyTorch's default initialisation (as ConvVideoGenerator): the ViT-style 0.02 one shrinks the
        # features ~4x per layer of this MLP stack, and training started measurably slower

    def reset_classifier(self, num_outputs: int) -> None:
        """Fresh pixel layers for `num_outputs` video channels (> 0)."""
        if num_outputs <= 0:
            raise ValueError("a video generator needs at least one output channel")
        ref = self.head.background.weight
        self.head = SpriteLayers(self.num_features, num_outputs, self.sprite_size, self.background_grid,
                                 self.video_height, self.video_width).to(device=ref.device, dtype=ref.dtype)
        self.video_channels = self.num_classes = num_outputs
        self._flops_cache.clear()

    def forward(self, text_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                return_trajectory: bool = False):
        return self.forward_head(self.forward_features(text_embeddings, attention_mask), attention_mask,
                                 return_trajectory=return_trajectory)

    def pool(self, text_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, Din) tokens -> (B, Din) mean, or (B, Q * Din) with the learned queries; a pooled
        (B, Din) input passes through (only with mean pooling)."""
        if self.queries is None:
            return text_embeddings if text_embeddings.ndim == 2 else masked_mean(text_embeddings, attention_mask)
        if text_embeddings.ndim != 3:
            raise ValueError("pooling_queries > 0 needs token embeddings (B, L, D), not a pooled (B, D)")
        scores = torch.einsum("qd,bld->bql", self.queries, text_embeddings) * text_embeddings.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        pooled = torch.einsum("bql,bld->bqd", scores.softmax(dim=-1), text_embeddings)  # (B, Q, Din)
        return pooled.flatten(1)

    def forward_features(self, text_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.run_block(self.condition, self.pool(text_embeddings, attention_mask))  # (B, F)

    def points(self, features: torch.Tensor) -> torch.Tensor:
        """Caption features (B, F) -> the sprite's point in each frame (B, T, 2), normalised ([-1, 1] is
        the frame). Unbounded on purpose: a point squashed into the frame (tanh) stops learning once it
        saturates at an edge, which a large early update did to every caption in a measured run."""
        b, t = features.shape[0], self.max_frames
        frames = self.frame_embed.weight[None].expand(b, t, -1)
        return self.trajectory(torch.cat([features[:, None].expand(b, t, -1), frames], dim=-1))

    def forward_head(self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     pre_logits: bool = False, return_trajectory: bool = False):
        if pre_logits:
            return features
        trajectory = self.points(features)
        video = self.head(features, trajectory)
        return (video, trajectory) if return_trajectory else video


@MODELS.register("conv_video_generator_micro")
def conv_video_generator_micro(**overrides: Any) -> ConvVideoGenerator:
    """Tiny convolutional generator: 128-d conditioning -> 4 x 4 seed -> 48-32-16 channels -> 8 frames of
    3 x 32 x 32."""
    return build(ConvVideoGenerator, overrides)


@MODELS.register("conv_video_generator_base")
def conv_video_generator_base(**overrides: Any) -> ConvVideoGenerator:
    """Convolutional generator at the design's clip size: 512-d conditioning -> 7 x 7 seed ->
    512-256-128-64-32 channels -> 16 frames of 3 x 224 x 224."""
    return build(ConvVideoGenerator, overrides, input_dimensions=512, conditioning_dimensions=512,
                 stage_channels=(512, 256, 128, 64, 32), video_height=224, video_width=224, max_frames=16,
                 text_sequence_length=64)


@MODELS.register("sprite_video_generator_micro")
def sprite_video_generator_micro(**overrides: Any) -> SpriteVideoGenerator:
    """Tiny layered generator: 128-d conditioning -> a 4 x 4 background and a 16-pixel sprite on a path,
    8 frames of 3 x 32 x 32."""
    return build(SpriteVideoGenerator, overrides)


@MODELS.register("sprite_video_generator_base")
def sprite_video_generator_base(**overrides: Any) -> SpriteVideoGenerator:
    """Layered generator at the design's clip size: 512-d conditioning -> an 8 x 8 background and a
    64-pixel sprite, 16 frames of 3 x 224 x 224."""
    return build(SpriteVideoGenerator, overrides, input_dimensions=512, conditioning_dimensions=512, sprite_size=64,
                 background_grid=8, video_height=224, video_width=224, max_frames=16, text_sequence_length=64)


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
