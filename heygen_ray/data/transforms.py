"""Pure batch transforms used on the training worker (and in Serve): no Ray, no I/O."""

from __future__ import annotations

import torch


def video_to_float(video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) from the data pipeline -> float (B, C, T, H, W) in [-1, 1].

    (B, C, T, H, W) is the layout every video model and loss in heygen_ray takes.
    """
    if video.dtype != torch.uint8:
        raise TypeError(f"expected uint8 video, got {video.dtype}")
    if video.dim() != 5:
        raise ValueError(f"expected (B, T, H, W, C), got shape {tuple(video.shape)}")
    return video.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def float_to_video(video: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`video_to_float`: float (B, C, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, C)."""
    x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous()
