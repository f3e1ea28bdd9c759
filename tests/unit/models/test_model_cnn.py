"""The CNN backbone and the frame-difference video classifier: the math of the stem and what it buys."""

from __future__ import annotations

import pytest
import torch

from heygen_ray.models import create_model
from heygen_ray.models.cnn import frame_differences


def test_frame_differences_are_each_frame_and_its_change():
    video = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3, 4, 2, 2) ** 1.5
    out = frame_differences(video)
    assert out.shape == (2, 6, 3, 2, 2)
    for t in range(3):
        torch.testing.assert_close(out[:, :3, t], video[:, :, t + 1])
        torch.testing.assert_close(out[:, 3:, t], video[:, :, t + 1] - video[:, :, t])
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_differences(video[:, :, :1])


def test_time_reversal_is_invisible_to_mean_pooled_frames_but_not_to_frame_differences():
    """A mean over time of per-frame features cannot tell a clip from its reverse (left from right);
    with frame differences the same backbone can."""
    torch.manual_seed(0)
    clip = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    reverse = clip.flip(2)
    plain = create_model("cnn_video_micro", frame_difference=False).eval()
    diff = create_model("cnn_video_micro").eval()
    def pooled(m, v):
        return m.forward_head(m.forward_features(v), pre_logits=True)

    with torch.no_grad():
        torch.testing.assert_close(pooled(plain, clip), pooled(plain, reverse), atol=1e-5, rtol=1e-5)
        a, b = pooled(diff, clip), pooled(diff, reverse)
        assert (a - b).norm() / a.norm() > 1e-2
    assert diff.backbone.in_channels == 6 and diff.example_inputs(1)["video"].shape == (1, 3, 8, 32, 32)


def test_position_features_widen_the_pooled_vector():
    net = create_model("cnn_micro", num_classes=0, position_features=16).eval()
    out = net(image=torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 2 * 64 + 16) and net.num_features == 2 * 64 + 16
    assert net.position[2].in_features == 8 * 8 * 8  # a linear over the whole 8 x 8 final map: where, not just what


def test_image_size_must_fit_the_strides():
    with pytest.raises(ValueError, match="multiple of the total stride"):
        create_model("cnn_micro", image_size=30)
