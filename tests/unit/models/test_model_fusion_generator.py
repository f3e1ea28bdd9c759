"""Fusion types, the video generator and the image-backbone video classifiers."""

from __future__ import annotations

import pytest
import torch

from heygen_ray.models import MultimodalFusionModule, create_model
from heygen_ray.models.fusion import FUSION_TYPES


@pytest.mark.parametrize("fusion_type", FUSION_TYPES)
def test_fusion_types(fusion_type):
    torch.manual_seed(0)
    model = create_model("multimodal_fusion_micro", fusion_type=fusion_type).eval()
    inputs = model.example_inputs(2)  # text (2, 16, 64) with sample 1 padded over 4 tokens; video (2, 8, 32)
    with torch.no_grad():
        features = model.forward_features(**inputs)
        pooled = model(**inputs)
        assert features.shape == (2, 16, 64) and pooled.shape == (2, 64)

        # the output depends on the video
        other_video = {**inputs, "video_embeddings": inputs["video_embeddings"] + 1.0}
        assert (model(**other_video) - pooled).abs().max() > 1e-3

        # padded text tokens do not influence the pooled output
        text = inputs["text_embeddings"].clone()
        text[1, -4:] += 10.0
        torch.testing.assert_close(model(**{**inputs, "text_embeddings": text}), pooled, rtol=0, atol=1e-5)

        # masked video tokens do not influence anything
        video_mask = torch.ones(2, 8, dtype=torch.bool)
        video_mask[:, -3:] = False
        masked = model(**inputs, video_mask=video_mask)
        video = inputs["video_embeddings"].clone()
        video[:, -3:] += 10.0
        torch.testing.assert_close(model(**{**inputs, "video_embeddings": video}, video_mask=video_mask), masked,
                                   rtol=0, atol=1e-5)


def test_fusion_types_differ_and_concat_updates_video():
    torch.manual_seed(0)
    text, video = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    outs = {}
    for kind in FUSION_TYPES:
        torch.manual_seed(0)
        layer = MultimodalFusionModule(16, 2, kind).eval()
        with torch.no_grad():
            outs[kind] = layer(text, video)
    assert outs["cross_attention"][1] is video and outs["gated"][1] is video
    assert outs["concat"][1].shape == video.shape and not torch.equal(outs["concat"][1], video)
    with pytest.raises(ValueError, match="fusion_type"):
        MultimodalFusionModule(16, 2, "sum")


def test_video_generator_output_layout_range_and_conditioning():
    torch.manual_seed(0)
    model = create_model("video_generator_micro").eval()
    inputs = model.example_inputs(2)
    with torch.no_grad():
        video = model(**inputs)
        assert video.shape == (2, 3, 8, 32, 32)  # (B, C, T, H, W)
        assert video.abs().max() <= 1.0
        other = model(text_embeddings=inputs["text_embeddings"] + 1.0, attention_mask=inputs["attention_mask"])
        assert (other - video).abs().max() > 1e-3  # conditioned on the text
        pooled_text = model(text_embeddings=inputs["text_embeddings"][:, 0])  # (B, Din) also accepted
        assert pooled_text.shape == video.shape


def test_video_generator_unpatchify_places_every_patch():
    model = create_model("video_generator_micro", max_frames=4, video_height=16, video_width=24)
    t, h, w = model.grid  # (2, 2, 3)
    c, tt, p = 3, model.tubelet_size, model.patch_size
    video = torch.arange(c * t * tt * h * p * w * p, dtype=torch.float32).view(1, c, t * tt, h * p, w * p)
    # reference patchify: token (ti, hi, wi) holds the (C, tt, p, p) cube at that position
    tokens = []
    for ti in range(t):
        for hi in range(h):
            for wi in range(w):
                cube = video[0, :, ti * tt : (ti + 1) * tt, hi * p : (hi + 1) * p, wi * p : (wi + 1) * p]
                tokens.append(cube.reshape(-1))
    patches = torch.stack(tokens).unsqueeze(0)  # (1, N, C * tt * p * p)
    assert torch.equal(model.unpatchify(patches), video)


def test_frame_classifier_uses_temporal_order_only_with_the_transformer():
    torch.manual_seed(0)
    mean_model = create_model("vit_video_micro").eval()
    temporal_model = create_model("vit_video_micro", temporal_pooling="transformer").eval()
    video = mean_model.example_inputs(2)["video"]
    reversed_video = video.flip(2)
    with torch.no_grad():
        torch.testing.assert_close(mean_model(video=reversed_video), mean_model(video=video), atol=1e-5, rtol=1e-5)
        assert (temporal_model(video=reversed_video) - temporal_model(video=video)).abs().max() > 1e-4
