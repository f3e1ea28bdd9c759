"""Swin Transformer (Liu et al., ICCV 2021): windowed attention with shifted windows.

State-dict layout follows timm's `SwinTransformer` (timm >= 0.9, the layout its published
`swin_tiny_patch4_window7_224` weights use): patch_embed.{proj, norm},
layers.S.downsample.{norm, reduction} (patch merging at the START of stages 1..3),
layers.S.blocks.M.{norm1, attn.relative_position_bias_table, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}, norm, head.fc. `relative_position_index` and `attn_mask` are non-persistent
buffers, as in timm. Blocks work on channels-last (B, H, W, C) tokens.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from heygen_ray.models.base import ModelBase, build, init_weights, new_linear_head, random_tensor
from heygen_ray.models.layers import DropPath, FeedForwardNetwork, drop_path_rates
from heygen_ray.registry import MODELS


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B * num_windows, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index_2d(window: int) -> torch.Tensor:
    """(window^2, window^2) index into the ((2w-1)^2)-entry bias table (the paper's eq. and timm's)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2), in [0, 2w-2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, window^2, window^2) additive mask: -100 between tokens that the cyclic shift
    brought together from different image regions, 0 elsewhere (the paper's value)."""
    region = torch.zeros(1, h, w, 1)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = count
            count += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, N)
    diff = ids[:, None, :] - ids[:, :, None]  # (nW, N, N)
    return torch.where(diff == 0, 0.0, -100.0)


class WindowedMultiHeadAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned 2D relative position bias.

    Input (B * num_windows, N = window^2, C); `mask` (num_windows, N, N) additive (shifted windows).
    Bias and mask are summed into the float `attn_mask` of `F.scaled_dot_product_attention`.
    """

    def __init__(
        self,
        embedding_dimensions: int,
        num_attention_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_attention_heads, self.window_size = num_attention_heads, window_size
        self.dropout_rate = dropout_rate
        table = torch.zeros((2 * window_size - 1) ** 2, num_attention_heads)
        self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
        self.register_buffer("relative_position_index", relative_position_index_2d(window_size), persistent=False)
        self.qkv = nn.Linear(embedding_dimensions, 3 * embedding_dimensions, bias=qkv_bias)
        self.proj = nn.Linear(embedding_dimensions, embedding_dimensions)
        self.proj_drop = nn.Dropout(dropout_rate)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, N, N)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bw, n, c = x.shape  # bw = B * num_windows
        h = self.num_attention_heads
        q, k, v = self.qkv(x).view(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # 3 x (bw, H, N, hd)
        bias = self.relative_position_bias().to(q.dtype)  # (1, H, N, N)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.to(q.dtype)[None, :, None]).view(-1, h, n, n)  # (1*nW, H, N, N)
            bias = bias.repeat(bw // nw, 1, 1, 1)  # (bw, H, N, N): window index is the fastest axis of bw
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout_rate if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(bw, n, c)))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention block on (B, H, W, C) tokens, pre-norm, with an MLP.

    If the feature map is no larger than the window, the window shrinks to it and the shift is
    dropped (as in the paper and timm). Sizes that are not a multiple of the window are padded.
    """

    def __init__(
        self,
        embedding_dimensions: int,
        input_resolution: Tuple[int, int],
        num_attention_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
        activation_function: str = "gelu",
    ) -> None:
        super().__init__()
        if min(input_resolution) <= window_size:
            window_size, shift_size = min(input_resolution), 0
        self.input_resolution, self.window_size, self.shift_size = tuple(input_resolution), window_size, shift_size
        d = embedding_dimensions
        self.norm1 = nn.LayerNorm(d)
        self.attn = WindowedMultiHeadAttention(d, num_attention_heads, window_size, qkv_bias, dropout_rate)
        self.drop_path1 = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = FeedForwardNetwork(d, int(d * mlp_ratio), activation_function, dropout_rate=dropout_rate)
        self.drop_path2 = DropPath(drop_path_rate)
        self.register_buffer("attn_mask", self._mask(*self.input_resolution), persistent=False)

    def _mask(self, h: int, w: int) -> Optional[torch.Tensor]:
        if self.shift_size == 0:
            return None
        ws = self.window_size
        return shifted_window_mask(-(-h // ws) * ws, -(-w // ws) * ws, ws, self.shift_size)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift_size
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = x.shape[1], x.shape[2]
        mask = self.attn_mask
        if s and (h, w) != self.input_resolution:
            mask = self._mask(h, w).to(x.device)
        y = self.attn(window_partition(x, ws), mask)  # (B * nW, ws * ws, C)
        y = window_reverse(y, ws, hp, wp)[:, :h, :w]
        return torch.roll(y, shifts=(s, s), dims=(1, 2)) if s else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        x = x + self.drop_path1(self._attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Downsample 2x: concatenate each 2 x 2 neighbourhood (4C), LayerNorm, Linear to out_dimensions."""

    def __init__(self, embedding_dimensions: int, out_dimensions: Optional[int] = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * embedding_dimensions)
        self.reduction = nn.Linear(4 * embedding_dimensions, out_dimensions or 2 * embedding_dimensions, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H/2, W/2, out)
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1], x.shape[2]
        # order of the 4 groups: (0,0), (1,0), (0,1), (1,1) = the paper's x0, x1, x2, x3
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating regular and shifted windows."""

    def __init__(
        self,
        in_dimensions: int,
        out_dimensions: int,
        input_resolution: Tuple[int, int],
        depth: int,
        num_attention_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float,
        dropout_rate: float,
        drop_path_rates: Sequence[float],
        activation_function: str,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dimensions, out_dimensions) if downsample else nn.Identity()
        resolution = tuple(r // 2 for r in input_resolution) if downsample else tuple(input_resolution)
        self.output_resolution = resolution
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                out_dimensions, resolution, num_attention_heads, window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                dropout_rate=dropout_rate, drop_path_rate=drop_path_rates[i], activation_function=activation_function,
            )
            for i in range(depth)
        )


class ClassifierHead(nn.Module):
    """Global average pool over (H, W), dropout, `fc` (timm's ClassifierHead names)."""

    def __init__(self, in_features: int, num_classes: int, dropout_rate: float, like: nn.Module) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout_rate)
        self.fc = new_linear_head(in_features, num_classes, like=like)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # (B, H, W, C) -> (B, K)
        x = self.drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.fc(x)


class SwinTransformer(ModelBase):
    """Hierarchical Swin image classifier.

    Input: `image` (B, C, H, W). forward_features -> (B, H/32, W/32, 8D) normed channels-last
    map (for patch 4 and 4 stages); forward -> logits (B, num_classes) after average pooling.
    """

    input_names = ("image",)

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 1000,
        embedding_dimensions: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_attention_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        activation_function: str = "gelu",
    ) -> None:
        super().__init__()
        if len(depths) != len(num_attention_heads):
            raise ValueError("depths and num_attention_heads need one entry per stage")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        dims = [embedding_dimensions * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embedding_dimensions, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embedding_dimensions)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        resolution = (image_size // patch_size, image_size // patch_size)
        stages = []
        for i, depth in enumerate(depths):
            stage = SwinStage(
                dims[max(i - 1, 0)], dims[i], resolution, depth, num_attention_heads[i], window_size,
                downsample=i > 0, mlp_ratio=mlp_ratio, dropout_rate=dropout_rate,
                drop_path_rates=rates[sum(depths[:i]) : sum(depths[: i + 1])], activation_function=activation_function,
            )
            resolution = stage.output_resolution
            stages.append(stage)
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, dropout_rate, like=self)
        self.apply(init_weights)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_outputs: int) -> None:
        self.head.fc = new_linear_head(self.num_features, num_outputs, like=self)
        self.num_classes = num_outputs
        self._flops_cache.clear()

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(image).permute(0, 2, 3, 1)  # (B, H/p, W/p, D)
        x = self.patch_embed.norm(x)
        for stage in self.layers:
            x = stage.downsample(x)
            for block in stage.blocks:
                x = self.run_block(block, x)
        return self.norm(x)  # (B, h, w, C)

    def forward_head(
        self, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, pre_logits: bool = False
    ) -> torch.Tensor:
        return self.head(features, pre_logits=pre_logits)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(image))

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        shape = (batch_size, self.in_channels, self.image_size, self.image_size)
        return {"image": random_tensor(shape, self._device())}


@MODELS.register("swin_t")
def swin_t(**overrides: Any) -> SwinTransformer:
    """Swin-T at 224 x 224, window 7, 1000 classes: exactly timm's `swin_tiny_patch4_window7_224`
    (28,288,354 params)."""
    return build(SwinTransformer, overrides, image_size=224, patch_size=4, embedding_dimensions=96,
                 depths=(2, 2, 6, 2), num_attention_heads=(3, 6, 12, 24), window_size=7, num_classes=1000)


@MODELS.register("swin_micro")
def swin_micro(**overrides: Any) -> SwinTransformer:
    """Tiny Swin for tests: 32 x 32 images, patch 2, window 4, two stages (16x16 -> 8x8), 16 classes;
    both stages have real shifted windows."""
    return build(SwinTransformer, overrides, image_size=32, patch_size=2, embedding_dimensions=32,
                 depths=(2, 2), num_attention_heads=(2, 4), window_size=4, num_classes=16, drop_path_rate=0.0)
