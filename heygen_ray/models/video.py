"""Video classifiers/encoders. Every one takes `video` as float (B, C, T, H, W) in [-1, 1].

- VideoTransformerEncoder: tubelet patches (ViViT-style joint space-time attention).
- ConvVideoEncoder: residual 3D-convolution network (R3D-style) with a classification head.
- FrameVideoClassifier: any image backbone (ViT, Swin, CNN) applied per frame, features pooled over
  time by a mean or a TemporalTransformer; with ``frame_difference`` each frame comes with its
  difference from the previous one, so even a mean over time sees motion (``cnn_video_*``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from heygen_ray.models.base import ModelBase, build, init_weights, new_linear_head, random_video
from heygen_ray.models.cnn import cnn_base, cnn_micro, frame_differences
from heygen_ray.models.layers import TransformerBlock, drop_path_rates
from heygen_ray.models.swin import swin_micro, swin_t
from heygen_ray.models.temporal import TemporalTransformer
from heygen_ray.models.vit import vit_b16, vit_micro
from heygen_ray.registry import MODELS


class TubeletEmbed(nn.Module):
    """Non-overlapping (tubelet x patch x patch) cubes -> tokens, via Conv3d with kernel = stride."""

    def __init__(self, tubelet_size: int, patch_size: int, in_channels: int, embedding_dimensions: int) -> None:
        super().__init__()
        size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embedding_dimensions, size, stride=size)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, D, T', H', W')
        return self.proj(video)


class ClipModel(ModelBase):
    """A model of one clip (``video``: (B, C, T, H, W)): logits from its pooled features."""

    input_names = ("video",)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(video))

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        shape = (batch_size, self.in_channels, self.num_frames, self.image_size, self.image_size)
        return {"video": random_video(shape, self._device())}


class VideoTransformerEncoder(ClipModel):
    """Transformer over space-time tubelet tokens with factorised learned positions
    (temporal + spatial embeddings, summed), mean-pooled for classification.

    Input: `video` (B, C, T, H, W) with T <= num_frames (a multiple of tubelet_size).
    forward_features -> (B, N, D), N = T/tubelet x (H/p) x (W/p) in (t, h, w) order;
    forward -> (B, num_classes) (the pooled D-wide embedding when num_classes == 0).
    """


    def __init__(
        self,
        num_frames: int = 16,
        image_size: int = 224,
        in_channels: int = 3,
        patch_size: int = 16,
        tubelet_size: int = 2,
        embedding_dimensions: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        feed_forward_dimensions: Optional[int] = None,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_gated_linear: bool = False,
        activation_function: str = "gelu",
        num_classes: int = 400,
    ) -> None:
        super().__init__()
        if num_frames % tubelet_size or image_size % patch_size:
            raise ValueError("num_frames / image_size must be multiples of tubelet_size / patch_size")
        self.num_frames, self.image_size, self.in_channels = num_frames, image_size, in_channels
        self.num_classes, self.num_features = num_classes, embedding_dimensions
        d = embedding_dimensions
        self.patch_embed = TubeletEmbed(tubelet_size, patch_size, in_channels, d)
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, num_frames // tubelet_size, 1, d))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, 1, (image_size // patch_size) ** 2, d))
        self.drop = nn.Dropout(dropout_rate)
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, num_attention_heads, feed_forward_dimensions, dropout_rate, rates[i],
                use_gated_linear=use_gated_linear, activation_function=activation_function,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = new_linear_head(d, num_classes, like=self)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed_temporal, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_spatial, std=0.02)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video)  # (B, D, T', H', W')
        b, d, t = x.shape[:3]
        if t > self.pos_embed_temporal.shape[1]:
            raise ValueError(f"{video.shape[2]} frames > num_frames {self.num_frames}")
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T', S, D)
        x = x + self.pos_embed_temporal[:, :t] + self.pos_embed_spatial  # space-time positions
        x = self.drop(x.reshape(b, -1, d))  # (B, N, D)
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        x = features.mean(dim=1)  # (B, D)
        return x if pre_logits else self.head(x)



def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with channels // 8 groups (at most 32)."""
    return nn.GroupNorm(max(1, min(32, channels // 8)), channels)


def norm3d(kind: str, channels: int) -> nn.Module:
    """``group`` (batch-size independent) or ``batch`` normalisation of a 3D feature map."""
    if kind == "group":
        return group_norm(channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


class ResidualBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (1x1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "group") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm3d(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm3d(norm, out_channels)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), norm3d(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, T, H, W) -> (B, Cout, T/s, H/s, W/s)
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.shortcut(x))


class ConvVideoEncoder(ClipModel):
    """Residual 3D CNN (R3D-18 layout at base size) with global pooling and a linear head.

    Stem: Conv3d (3, 7, 7) stride (1, 2, 2); stages of residual blocks, each after the first
    halving T, H and W. ``norm``: GroupNorm (batch-size independent; the base preset) or BatchNorm
    (the micro preset: on the embedded set's small objects GroupNorm left the network at chance for
    hundreds of steps where BatchNorm learned; with gradient checkpointing its running statistics
    are updated twice per step).
    Input: `video` (B, C, T, H, W). forward_features -> (B, C', T', H', W'); forward -> (B, num_classes).
    """


    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 400,
        stage_channels: Sequence[int] = (64, 128, 256, 512),
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        dropout_rate: float = 0.0,
        num_frames: int = 16,
        image_size: int = 112,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if len(stage_channels) != len(blocks_per_stage):
            raise ValueError("stage_channels and blocks_per_stage need one entry per stage")
        self.in_channels, self.num_frames, self.image_size = in_channels, num_frames, image_size  # example shape
        self.num_classes, self.num_features = num_classes, stage_channels[-1]
        c0 = stage_channels[0]
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, c0, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            norm3d(norm, c0),
            nn.ReLU(inplace=True),
        )
        blocks, c_in = [], c0
        for i, (c, n) in enumerate(zip(stage_channels, blocks_per_stage)):
            for j in range(n):
                blocks.append(ResidualBlock3d(c_in, c, stride=2 if (i > 0 and j == 0) else 1, norm=norm))
                c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.drop = nn.Dropout(dropout_rate)
        self.head = new_linear_head(self.num_features, num_classes, like=self)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        x = self.stem(video)  # (B, c0, T, H/2, W/2)
        for block in self.blocks:
            x = self.run_block(block, x)
        return x

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        x = self.drop(features.mean(dim=(2, 3, 4)))  # (B, C')
        return x if pre_logits else self.head(x)



class FrameVideoClassifier(ClipModel):
    """Video classification with an image backbone: frames -> backbone pre-logits features
    (B, T, D) -> mean over time (temporal_pooling="mean") or a TemporalTransformer
    ("transformer", bidirectional unless temporal_causal) -> linear head.

    With ``frame_difference`` the backbone sees, for each frame from the second on, the frame and its
    difference from the one before (2C input channels, T-1 steps): a mean over time of per-frame
    features cannot tell left from right, the differences can.

    Input: `video` (B, C, T, H, W). forward_features -> (B, T, D) per-frame (or temporally mixed)
    features (T-1 steps with frame_difference); forward -> (B, num_classes). The backbone's own head
    is reset to identity.
    """


    def __init__(
        self,
        backbone: ModelBase,
        num_frames: int = 8,
        num_classes: int = 16,
        temporal_pooling: str = "mean",
        temporal_num_layers: int = 2,
        temporal_num_attention_heads: Optional[int] = None,
        temporal_causal: bool = False,
        dropout_rate: float = 0.0,
        frame_difference: bool = False,
    ) -> None:
        super().__init__()
        if temporal_pooling not in ("mean", "transformer"):
            raise ValueError(f"temporal_pooling must be 'mean' or 'transformer', got {temporal_pooling!r}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.frame_difference = frame_difference
        self.num_frames, self.num_classes = num_frames, num_classes
        steps = num_frames - 1 if frame_difference else num_frames  # per-frame feature vectors
        self.num_features = d = backbone.num_features
        self.temporal: Optional[TemporalTransformer] = None
        if temporal_pooling == "transformer":
            heads = temporal_num_attention_heads or max(1, d // 64)
            self.temporal = TemporalTransformer(
                input_dimensions=d, hidden_dimensions=d, num_layers=temporal_num_layers, num_attention_heads=heads,
                max_frames=steps, dropout_rate=dropout_rate, causal=temporal_causal, num_classes=0,
            )
        self.drop = nn.Dropout(dropout_rate)
        self.head = new_linear_head(d, num_classes, like=self)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        if self.frame_difference:
            video = frame_differences(video)  # (B, 2C, T-1, H, W)
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        x = self.backbone.forward_head(self.backbone.forward_features(frames), pre_logits=True)  # (B*T, D)
        x = x.view(b, t, -1)
        return self.temporal.forward_features(x) if self.temporal is not None else x  # (B, T, D)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        x = self.temporal.pool(features) if self.temporal is not None else features.mean(dim=1)
        x = self.drop(x)
        return x if pre_logits else self.head(x)

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        image = self.backbone.example_inputs(1)["image"]
        channels = image.shape[1] // 2 if self.frame_difference else image.shape[1]
        shape = (batch_size, channels, self.num_frames, image.shape[2], image.shape[3])
        return {"video": random_video(shape, self._device())}


_FRAME_ARGS = ("num_frames", "num_classes", "temporal_pooling", "temporal_num_layers",
               "temporal_num_attention_heads", "temporal_causal", "dropout_rate", "frame_difference")


def _frame_classifier(backbone_builder: Any, overrides: Dict[str, Any], **defaults: Any) -> FrameVideoClassifier:
    """Split overrides: FrameVideoClassifier's own arguments vs. the backbone's (image_size, ...).
    With frame_difference the backbone takes twice the video's channels (``in_channels`` names the
    video's)."""
    own = {k: v for k, v in overrides.items() if k in _FRAME_ARGS}
    backbone_args = {k: v for k, v in overrides.items() if k not in _FRAME_ARGS}
    if "dropout_rate" in own:
        backbone_args["dropout_rate"] = own["dropout_rate"]
    if own.get("frame_difference", defaults.get("frame_difference", False)):
        backbone_args["in_channels"] = 2 * backbone_args.get("in_channels", 3)
    backbone = backbone_builder(num_classes=0, **backbone_args)
    return build(FrameVideoClassifier, own, backbone=backbone, **defaults)


# -- presets ---------------------------------------------------------------------------------------
@MODELS.register("video_transformer_base")
def video_transformer_base(**overrides: Any) -> VideoTransformerEncoder:
    """ViViT-B-sized joint space-time encoder: 16 x 224 x 224, tubelet 2 x 16 x 16 (1568 tokens),
    768 x 12 layers x 12 heads, 400 classes (Kinetics-400)."""
    return build(VideoTransformerEncoder, overrides, num_frames=16, image_size=224, patch_size=16, tubelet_size=2,
                 embedding_dimensions=768, num_layers=12, num_attention_heads=12, num_classes=400)


@MODELS.register("video_transformer_micro")
def video_transformer_micro(**overrides: Any) -> VideoTransformerEncoder:
    """Tiny video transformer: 8 x 32 x 32, tubelet 2 x 8 x 8 (64 tokens), 64 x 2 layers, 16 classes."""
    return build(VideoTransformerEncoder, overrides, num_frames=8, image_size=32, patch_size=8, tubelet_size=2,
                 embedding_dimensions=64, num_layers=2, num_attention_heads=2, feed_forward_dimensions=128,
                 num_classes=16)


@MODELS.register("conv_video_encoder_base")
def conv_video_encoder_base(**overrides: Any) -> ConvVideoEncoder:
    """R3D-18 layout (64-128-256-512, 2 blocks per stage) on 16 x 112 x 112 clips, 400 classes."""
    return build(ConvVideoEncoder, overrides, stage_channels=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2),
                 num_classes=400, num_frames=16, image_size=112)


@MODELS.register("conv_video_encoder_micro")
def conv_video_encoder_micro(**overrides: Any) -> ConvVideoEncoder:
    """Tiny 3D CNN: 16-32-64 channels, one block per stage, BatchNorm, 8 x 32 x 32 clips, 16 classes."""
    return build(ConvVideoEncoder, overrides, stage_channels=(16, 32, 64), blocks_per_stage=(1, 1, 1),
                 num_classes=16, num_frames=8, image_size=32, norm="batch")


@MODELS.register("vit_video_base")
def vit_video_base(**overrides: Any) -> FrameVideoClassifier:
    """ViT-B/16 (the `vit_b16` architecture) per frame, 8 x 224 x 224, mean over time, 400 classes."""
    return _frame_classifier(vit_b16, overrides, num_frames=8, num_classes=400)


@MODELS.register("vit_video_micro")
def vit_video_micro(**overrides: Any) -> FrameVideoClassifier:
    """`vit_micro` per frame, 8 x 32 x 32, mean over time (temporal_pooling="transformer" to use
    a TemporalTransformer), 16 classes."""
    return _frame_classifier(vit_micro, overrides, num_frames=8, num_classes=16)


@MODELS.register("swin_video_base")
def swin_video_base(**overrides: Any) -> FrameVideoClassifier:
    """Swin-T (the `swin_t` architecture) per frame, 8 x 224 x 224, mean over time, 400 classes."""
    return _frame_classifier(swin_t, overrides, num_frames=8, num_classes=400)


@MODELS.register("swin_video_micro")
def swin_video_micro(**overrides: Any) -> FrameVideoClassifier:
    """`swin_micro` per frame, 8 x 32 x 32, mean over time, 16 classes."""
    return _frame_classifier(swin_micro, overrides, num_frames=8, num_classes=16)


@MODELS.register("cnn_video_micro")
def cnn_video_micro(**overrides: Any) -> FrameVideoClassifier:
    """`cnn_micro` per frame on frames + frame differences (TSN-style), 8 x 32 x 32, mean over time,
    16 classes. Measured on the embedded set (one process, batch 16): 99.8% top-1 after 400 steps."""
    return _frame_classifier(cnn_micro, overrides, num_frames=8, num_classes=16, frame_difference=True)


@MODELS.register("cnn_video_base")
def cnn_video_base(**overrides: Any) -> FrameVideoClassifier:
    """`cnn_base` per frame on frames + frame differences, 8 x 224 x 224, mean over time, 400 classes."""
    return _frame_classifier(cnn_base, overrides, num_frames=8, num_classes=400, frame_difference=True)
