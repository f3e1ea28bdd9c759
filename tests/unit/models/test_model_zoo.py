"""Registry-driven tests over every tiny preset: shapes, gradients, checkpointing, heads, FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import heygen_ray.models.base as base
from heygen_ray.models import (
    ModelBase,
    UnknownArgumentError,
    create_model,
    list_models,
    model_inputs,
    unwrap_model,
)
from heygen_ray.models.generator import SpriteLayers
from heygen_ray.registry import UnknownNameError

MICRO = list_models("_micro")
# extra configurations of the micro presets that exercise code paths the defaults do not
VARIANTS = [
    ("vit_video_micro", {"temporal_pooling": "transformer"}),
    ("text_decoder_micro", {"use_cross_attention": True, "memory_dimensions": 32}),
    ("multimodal_fusion_micro", {"fusion_type": "concat"}),
    ("multimodal_fusion_micro", {"fusion_type": "gated"}),
    ("video_generator_micro", {"caption_modulation": True}),
    ("text_to_video_micro", {"caption_modulation": False}),
    ("cnn_micro", {"position_features": 8}),
    ("cnn_video_micro", {"position_features": 16, "temporal_pooling": "transformer"}),
    ("video_text_matching_cnn_micro", {"projection": "linear"}),
]
CASES = [(n, {}) for n in MICRO] + VARIANTS
IDS = [n + "".join(f"-{v}" for v in o.values()) for n, o in CASES]

EXPECTED_OUTPUT = {
    "vit_micro": (2, 16),
    "swin_micro": (2, 16),
    "vit_video_micro": (2, 16),
    "swin_video_micro": (2, 16),
    "conv_video_encoder_micro": (2, 16),
    "video_transformer_micro": (2, 16),
    "temporal_transformer_micro": (2, 16),
    "text_decoder_micro": (2, 64, 512),
    "text_processor_micro": (2, 64),
    "multimodal_fusion_micro": (2, 64),
    "video_generator_micro": (2, 3, 8, 32, 32),
    "text_to_video_micro": (2, 3, 8, 32, 32),
    "video_text_matching_micro": (2, 2),
    "cnn_micro": (2, 16),
    "cnn_video_micro": (2, 16),
    "video_text_matching_cnn_micro": (2, 2),
    "conv_video_generator_micro": (2, 3, 8, 32, 32),
    "text_to_video_conv_micro": (2, 3, 8, 32, 32),
    "sprite_video_generator_micro": (2, 3, 8, 32, 32),
    "text_to_video_sprite_micro": (2, 3, 8, 32, 32),
}

FIXED_HEADS = {"video_text_matching_micro", "video_text_matching_cnn_micro"}


def build(name: str, overrides: dict) -> ModelBase:
    torch.manual_seed(0)
    return create_model(name, **overrides)


def scalar_loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output (a plain sum is blind behind a final LayerNorm)."""
    g = torch.Generator().manual_seed(1)
    return (out * torch.randn(out.shape, generator=g)).sum()


def test_every_family_has_a_micro_preset_and_a_base_preset():
    assert set(EXPECTED_OUTPUT) == set(MICRO)
    names = set(list_models())
    for base_name in ["vit_b16", "swin_t", "video_generator_base", "text_processor_base", "multimodal_fusion_base",
                      "temporal_transformer_base", "conv_video_encoder_base", "video_transformer_base",
                      "text_decoder_base", "vit_video_base", "swin_video_base", "cnn_base", "cnn_video_base",
                      "video_text_matching_base", "conv_video_generator_base", "text_to_video_base",
                      "sprite_video_generator_base"]:
        assert base_name in names


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_forward_shapes(name, overrides):
    model = build(name, overrides).eval()
    inputs = model.example_inputs(2)
    assert set(inputs) <= set(model.input_names)
    if "video" in inputs:
        assert inputs["video"].shape == (2, 3, 8, 32, 32)  # the embedded data set's clip shape
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == EXPECTED_OUTPUT[name]
    assert torch.isfinite(out).all()
    features = model.forward_features(**inputs)
    pooled = model.forward_head(features, attention_mask=inputs.get("attention_mask"), pre_logits=True)
    assert pooled.shape[-1] == model.num_features


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_backward_reaches_every_parameter(name, overrides):
    model = build(name, overrides).train()
    scalar_loss(model(**model.example_inputs(2))).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_grad_checkpointing_same_outputs_and_grads(name, overrides, monkeypatch):
    plain = build(name, overrides).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    real = base.checkpoint
    monkeypatch.setattr(base, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = plain.example_inputs(2)
    out_plain, out_ckpt = plain(**inputs), ckpt(**inputs)
    assert calls, "checkpointing was switched on but no block was checkpointed"
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    scalar_loss(out_plain).backward()
    scalar_loss(out_ckpt).backward()
    grads = dict(ckpt.named_parameters())
    for pname, p in plain.named_parameters():
        torch.testing.assert_close(grads[pname].grad, p.grad, rtol=1e-5, atol=1e-6, msg=pname)
    # eval mode never checkpoints
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(**inputs)
    assert not calls


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_reset_classifier_changes_the_output_width(name, overrides):
    model = build(name, overrides).eval()
    inputs = model.example_inputs(2)
    if name in FIXED_HEADS:  # two scores with fixed meanings: resetting them is refused, not ignored
        with pytest.raises(NotImplementedError, match="fixed heads"):
            model.reset_classifier(7)
        return
    model.reset_classifier(7)
    with torch.no_grad():
        out = model(**inputs)
    if "generator" in name or "text_to_video" in name:  # the head makes 7 video channels
        assert out.shape == (2, 7, 8, 32, 32)
    else:
        assert out.shape[-1] == 7
    conv_head = name in ("conv_video_generator_micro", "text_to_video_conv_micro")  # a transposed conv makes pixels
    sprite_head = name in ("sprite_video_generator_micro", "text_to_video_sprite_micro")  # background + sprite layers
    expected = nn.ConvTranspose2d if conv_head else (SpriteLayers if sprite_head else nn.Linear)
    assert isinstance(model.get_classifier(), expected)
    assert model.num_classes == 7


def test_reset_classifier_to_zero_returns_features():
    model = build("vit_micro", {}).eval()
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(**model.example_inputs(2)).shape == (2, model.num_features)
    with pytest.raises(ValueError):
        build("video_generator_micro", {}).reset_classifier(0)


@pytest.mark.parametrize("name", MICRO)
def test_flops_per_sample_is_positive_cached_and_batch_independent(name):
    model = build(name, {})
    flops = model.flops_per_sample()
    assert flops > 0
    assert model.flops_per_sample() == flops
    assert model.flops_per_sample(model.example_inputs(2)) == flops


def vit_flops(image, patch, channels, width, depth, mlp, classes, cls_token=True):
    """Hand count: 2 FLOPs per multiply-add of every matmul/conv/attention product."""
    n = (image // patch) ** 2
    tokens = n + int(cls_token)
    patch_embed = 2 * n * width * channels * patch * patch
    per_block = (2 * tokens * width * 3 * width  # qkv
                 + 2 * 2 * tokens * tokens * width  # q k^T and attn v over all heads
                 + 2 * tokens * width * width  # proj
                 + 2 * 2 * tokens * width * mlp)  # fc1 + fc2
    return patch_embed + depth * per_block + 2 * width * classes


def test_flops_per_sample_matches_a_hand_count():
    model = build("vit_micro", {})
    assert model.flops_per_sample() == vit_flops(32, 8, 3, 64, 2, 128, 16)
    model.reset_classifier(5)  # the cache is invalidated with the head
    assert model.flops_per_sample() == vit_flops(32, 8, 3, 64, 2, 128, 5)


def test_create_model_rejects_unknown_overrides_and_names():
    with pytest.raises(UnknownArgumentError) as info:
        create_model("vit_micro", num_clases=3)
    assert "num_clases" in str(info.value) and "vit_micro" in str(info.value)
    assert isinstance(info.value, TypeError)
    with pytest.raises(UnknownArgumentError, match="swin_video_micro.*not_an_arg"):
        create_model("swin_video_micro", not_an_arg=1)
    with pytest.raises(UnknownNameError, match="vit_micro"):
        create_model("vit_mikro")


def test_overrides_reach_the_model():
    model = create_model("vit_video_micro", num_frames=4, image_size=16, num_classes=3, in_channels=1)
    inputs = model.example_inputs(2)
    assert inputs["video"].shape == (2, 1, 4, 16, 16)
    assert model(**inputs).shape == (2, 3)
    gen = create_model("video_generator_micro", max_frames=4, video_height=16, video_width=24)
    assert gen(**gen.example_inputs(1)).shape == (1, 3, 4, 16, 24)


def test_model_inputs_picks_the_forward_arguments_through_wrappers():
    model = build("text_processor_micro", {})
    batch = {**model.example_inputs(2), "labels": torch.zeros(2), "video": torch.zeros(1)}
    picked = model_inputs(model, batch)
    assert set(picked) == {"input_ids", "attention_mask"}

    class Wrapper(nn.Module):  # stands in for DDP (.module)
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert unwrap_model(Wrapper(model)) is model
    assert set(model_inputs(Wrapper(model), batch)) == {"input_ids", "attention_mask"}
    with pytest.raises(TypeError):
        unwrap_model(nn.Linear(2, 2))


# -- canonical architectures ---------------------------------------------------------------------
def test_vit_b16_is_the_published_architecture():
    with torch.device("meta"):
        model = create_model("vit_b16")
        out = model(**model.example_inputs(1))
    assert out.shape == (1, 1000)
    assert sum(p.numel() for p in model.parameters()) == 86_567_656
    keys = set(model.state_dict())
    assert len(keys) == 152
    for key in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.norm1.weight",
                "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.5.mlp.fc1.weight",
                "blocks.5.mlp.fc2.bias", "blocks.0.norm2.bias", "norm.weight", "head.weight", "head.bias"]:
        assert key in keys, key
    assert model.pos_embed.shape == (1, 197, 768)
    assert model.flops_per_sample() == vit_flops(224, 16, 3, 768, 12, 3072, 1000)


def test_swin_t_is_the_published_architecture():
    with torch.device("meta"):
        model = create_model("swin_t")
        out = model(**model.example_inputs(1))
    assert out.shape == (1, 1000)
    assert sum(p.numel() for p in model.parameters()) == 28_288_354
    keys = set(model.state_dict())
    assert len(keys) == 173
    for key in ["patch_embed.proj.weight", "patch_embed.norm.weight",
                "layers.0.blocks.1.attn.relative_position_bias_table", "layers.2.blocks.5.attn.qkv.weight",
                "layers.1.downsample.norm.weight", "layers.3.downsample.reduction.weight",
                "layers.3.blocks.1.mlp.fc2.bias", "norm.bias", "head.fc.weight", "head.fc.bias"]:
        assert key in keys, key
    assert not any("relative_position_index" in k or "attn_mask" in k for k in keys)  # non-persistent, as timm
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (169, 3)
    assert [s.blocks[1].shift_size for s in model.layers] == [3, 3, 3, 0]  # 7x7 last stage: no shift
    assert 4.4e9 < model.flops_per_sample() / 2 < 4.6e9  # the paper's 4.5 GMACs


def test_flops_are_counted_in_eval_mode_and_leave_the_training_flags():
    """A one-sample FLOP count of a training-mode model with BatchNorm1d (which cannot normalise a
    batch of one) works, and every module keeps its mode."""
    model = build("sprite_video_generator_micro", {}).train()
    model.condition.insert(0, nn.BatchNorm1d(model.condition[0].in_features))
    model.head.eval()
    flops = model.flops_per_sample({"text_embeddings": torch.randn(1, 128)})
    assert flops > 0
    assert model.training and model.condition[0].training and not model.head.training
