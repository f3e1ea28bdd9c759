"""Vision Transformer (Dosovitskiy et al., ICLR 2021), image classifier on 2D patches.

State-dict layout follows timm's `VisionTransformer` (timm >= 0.9): patch_embed.proj, cls_token,
pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head; so the
published `vit_base_patch16_224` weights load with `load_state_dict(strict=True)`.
Video classification with ViT goes through `video.FrameVideoClassifier` (per-frame features).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from heygen_ray.models.base import ModelBase, build, init_weights, new_linear_head, random_tensor
from heygen_ray.models.layers import TransformerBlock, drop_path_rates
from heygen_ray.registry import MODELS


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: Conv2d with kernel = stride = patch_size."""

    def __init__(self, patch_size: int, in_channels: int, embedding_dimensions: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embedding_dimensions, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(ModelBase):
    """ViT: patch tokens (+ class token) with learned position embeddings, pre-norm blocks.

    Input: `image` (B, C, H, W). forward_features -> (B, 1 + N, D) normed tokens (class token
    first when `class_token`); forward -> logits (B, num_classes) from the class token (or the mean
    of the patch tokens with pooling="mean").
    """

    input_names = ("image",)

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_classes: int = 1000,
        embedding_dimensions: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        feed_forward_dimensions: int = 3072,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        class_token: bool = True,
        pooling: str = "token",
        activation_function: str = "gelu",
        use_gated_linear: bool = False,
        use_relative_position: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if pooling not in ("token", "mean") or (pooling == "token" and not class_token):
            raise ValueError(f"pooling must be 'token' (needs class_token) or 'mean', got {pooling!r}")
        self.image_size, self.in_channels, self.pooling = image_size, in_channels, pooling
        self.num_classes, self.num_features = num_classes, embedding_dimensions
        num_patches = (image_size // patch_size) ** 2
        d = embedding_dimensions
        self.patch_embed = PatchEmbed(patch_size, in_channels, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(class_token), d))
        self.pos_drop = nn.Dropout(dropout_rate)
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, num_attention_heads, feed_forward_dimensions, dropout_rate, rates[i],
                use_relative_position=use_relative_position, use_gated_linear=use_gated_linear,
                activation_function=activation_function, norm_eps=norm_eps,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d, eps=norm_eps)
        self.head = new_linear_head(d, num_classes, like=self)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        start = int(self.cls_token is not None)
        x = features[:, 0] if self.pooling == "token" else features[:, start:].mean(dim=1)  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(image))

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        shape = (batch_size, self.in_channels, self.image_size, self.image_size)
        return {"image": random_tensor(shape, self._device())}


@MODELS.register("vit_b16")
def vit_b16(**overrides: Any) -> VisionTransformer:
    """ViT-B/16 at 224 x 224, 1000 classes: exactly timm's `vit_base_patch16_224` (86,567,656 params)."""
    return build(VisionTransformer, overrides, image_size=224, patch_size=16, embedding_dimensions=768,
                 num_layers=12, num_attention_heads=12, feed_forward_dimensions=3072, num_classes=1000)


@MODELS.register("vit_micro")
def vit_micro(**overrides: Any) -> VisionTransformer:
    """Tiny ViT for tests: 32 x 32 images, 8 x 8 patches, width 64, 2 blocks, 16 classes."""
    return build(VisionTransformer, overrides, image_size=32, patch_size=8, embedding_dimensions=64,
                 num_layers=2, num_attention_heads=2, feed_forward_dimensions=128, num_classes=16)
