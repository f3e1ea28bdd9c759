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


def test_sprite_generator_pastes_its_sprite_where_the_trajectory_says():
    """A hand-set sprite (an opaque 4 x 4 white square in a 16-pixel sprite, nothing else) on a black
    background lands centred on each frame's point of the trajectory, and the composite's object
    centroid is that point in pixels (the loss's anchor)."""
    from heygen_ray.losses import object_centroids, trajectory_pixels
    from heygen_ray.models.generator import SpriteVideoGenerator

    torch.manual_seed(0)
    model = SpriteVideoGenerator(input_dimensions=8, conditioning_dimensions=8, sprite_size=16, max_frames=3).eval()
    s = 16
    with torch.no_grad():
        model.head.background.weight.zero_()
        model.head.background.bias.fill_(-10.0)  # tanh -> -1: black
        model.head.sprite[-1].weight.zero_()
        bias = torch.full((4, s, s), -10.0)  # colour -1, opacity sigmoid(-12) ~ 0
        bias[:3, 6:10, 6:10] = 10.0  # white
        bias[3, 6:10, 6:10] = 12.0  # opaque
        model.head.sprite[-1].bias.copy_(bias.flatten())
    features = model.forward_features(torch.randn(1, 8))
    # points at pixel centres 8.5 -> normalised (2 * 8.5 + 1) / 32 - 1 = -0.4375 etc.
    pixels = torch.tensor([[[8.5, 8.5], [20.5, 8.5], [20.5, 24.5]]])
    trajectory = (pixels + 0.5) / 16 - 1
    with torch.no_grad():
        video = model.head(features, trajectory)
    assert video.shape == (1, 3, 3, 32, 32) and video.abs().max() <= 1.0
    torch.testing.assert_close(trajectory_pixels(trajectory, 32, 32), pixels)
    torch.testing.assert_close(object_centroids(video), pixels, atol=1e-3, rtol=0)
    assert video[0, :, 0, 7:11, 7:11].min() > 0.99 and video[0, :, 0, 20:, 20:].max() < -0.99
    # the trajectory is a differentiable output of the caption features
    _, traj = model(torch.randn(2, 8), return_trajectory=True)
    assert traj.shape == (2, 3, 2) and traj.requires_grad
    with pytest.raises(ValueError, match="sprite_size"):
        SpriteVideoGenerator(sprite_size=0)


def test_text_to_video_reports_the_trajectory_of_a_sprite_generator_only():
    torch.manual_seed(0)
    sprite = create_model("text_to_video_sprite_micro").eval()
    inputs = sprite.example_inputs(2)
    with torch.no_grad():
        out = sprite(**inputs, outputs="all")
        assert out["trajectory"].shape == (2, 8, 2)
        torch.testing.assert_close(out["video"], sprite(**inputs))
        conv = create_model("text_to_video_conv_micro").eval()
        assert conv(**inputs, outputs="all")["trajectory"] is None
    with pytest.raises(ValueError, match="outputs"):
        sprite(**inputs, outputs="logits")


def test_sprite_generator_pools_tokens_with_learned_queries():
    """pooling_queries: each query is a softmax over the unmasked tokens (a query aligned with one token
    picks it), so padding changes nothing and a pooled (B, D) input is refused."""
    from heygen_ray.models.generator import SpriteVideoGenerator

    torch.manual_seed(0)
    model = SpriteVideoGenerator(input_dimensions=4, conditioning_dimensions=8, pooling_queries=2, max_frames=2).eval()
    tokens = torch.eye(4)[None].repeat(2, 1, 1) * 30.0  # token i = 30 * e_i
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    with torch.no_grad():
        model.queries.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]))
        pooled = model.pool(tokens, mask)
    assert pooled.shape == (2, 8)
    torch.testing.assert_close(pooled[0, :4], tokens[0, 0], atol=1e-3, rtol=0)  # query 0 picks token 0
    torch.testing.assert_close(pooled[0, 4:], tokens[0, 2], atol=1e-3, rtol=0)  # query 1 picks token 2
    changed = tokens.clone()
    changed[:, 3] = 99.0  # the padded token of sample 0, a real one of sample 1
    with torch.no_grad():
        out, again = model(tokens, mask), model(changed, mask)
    torch.testing.assert_close(again[0], out[0])
    assert not torch.allclose(again[1], out[1])
    with pytest.raises(ValueError, match="pooling_queries"):
        model(torch.randn(2, 4))
