"""Attention, masks and feed-forward layers against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heygen_ray.models import AttentionMechanism, FeedForwardNetwork, MultiHeadCrossAttention, TransformerBlock, create_model
from heygen_ray.models.layers import make_activation, relative_position_index


def reference_attention(q, k, v, table=None, max_distance=0, causal=False, key_mask=None):
    """Explicit softmax attention with a clipped relative bias, causal and key-padding masks."""
    lq, lk = q.shape[-2], k.shape[-2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if table is not None:
        for i in range(lq):
            for j in range(lk):
                offset = max(-max_distance, min(max_distance, j - (i + lk - lq)))
                logits[:, :, i, j] += table[:, offset + max_distance]
    if causal:
        logits = logits.masked_fill(torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).logical_not(), float("-inf"))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_attention_mechanism_matches_explicit_softmax(causal, use_bias, padding):
    torch.manual_seed(0)
    mech = AttentionMechanism(2, causal=causal, use_relative_position=use_bias, max_relative_position=3)
    if use_bias:
        torch.nn.init.normal_(mech.relative_position_bias_table)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    key_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2]) if padding else None
    out = mech(q, k, v, key_padding_mask=key_mask)
    table = mech.relative_position_bias_table.detach() if use_bias else None
    ref = reference_attention(q, k, v, table, 3, causal, key_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_relative_position_index_clips_and_aligns():
    idx = relative_position_index(3, 5, max_distance=2, device=torch.device("cpu"))
    # query i is aligned with key i + 2; entries are clipped offsets (key - query) + 2
    assert idx.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3], [0, 0, 0, 1, 2]]


def test_relative_position_bias_changes_outputs():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 32, use_relative_position=True, max_relative_position=4).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        block.attn.mechanism.relative_position_bias_table.zero_()
        flat = block(x)
        block.attn.mechanism.relative_position_bias_table.copy_(torch.linspace(-2, 2, 18).view(2, 9))
        biased = block(x)
    assert (flat - biased).abs().max() > 1e-3
    # and a model-level check: the decoder's tables are used
    model = create_model("text_decoder_micro").eval()
    inputs = model.example_inputs(1)
    with torch.no_grad():
        before = model(**inputs)
        for blk in model.blocks:
            blk.attn.mechanism.relative_position_bias_table.normal_(0, 1.0)
        assert (model(**inputs) - before).abs().max() > 1e-3


def test_cross_attention_uses_the_relative_position_bias():
    """use_relative_position reaches the block's cross-attention too: its table exists, moving it
    changes the block's output, and the bias is the one of explicit attention over the context."""
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 32, use_relative_position=True, max_relative_position=4,
                             use_cross_attention=True).eval()
    table = block.cross_attn.mechanism.relative_position_bias_table
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        table.zero_()
        flat = block(x, context=context)
        table.copy_(torch.linspace(-2, 2, 18).view(2, 9))
        biased = block(x, context=context)
        assert (flat - biased).abs().max() > 1e-3
        # the cross-attention core against the explicit reference with that table (Lq=5, Lk=7)
        attn = block.cross_attn
        q = attn.q(x).view(2, 5, 2, -1).transpose(1, 2)
        k, v = attn.kv(context).view(2, 7, 2, 2, -1).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(attn.mechanism(q, k, v), reference_attention(q, k, v, table, 4), atol=1e-5, rtol=1e-5)
    no_bias = TransformerBlock(16, 2, 32, use_cross_attention=True)
    assert not hasattr(no_bias.cross_attn.mechanism, "relative_position_bias_table")


def perturb_after(tensor: torch.Tensor, t: int) -> torch.Tensor:
    out = tensor.clone()
    out[:, t + 1] = out[:, t + 1] + 3.0 if out.is_floating_point() else (out[:, t + 1] + 7) % 512
    return out


@pytest.mark.parametrize("cross", [False, True])
def test_decoder_is_causal(cross):
    overrides = {"use_cross_attention": True} if cross else {}
    model = create_model("text_decoder_micro", **overrides).eval()
    inputs = model.example_inputs(2)
    t = 20
    changed = {**inputs, "input_ids": perturb_after(inputs["input_ids"], t)}
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax(dim=(1, 2)).min() > 1e-4  # the future does change


@pytest.mark.parametrize("use_relative_position", [False, True])
def test_temporal_transformer_is_causal(use_relative_position):
    model = create_model("temporal_transformer_micro", causal=True, use_relative_position=use_relative_position).eval()
    x = model.example_inputs(2)["frame_features"]
    t = 3
    with torch.no_grad():
        a = model.forward_features(x)
        b = model.forward_features(perturb_after(x, t))
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3


def test_non_causal_temporal_transformer_sees_the_future():
    model = create_model("temporal_transformer_micro", causal=False).eval()
    x = model.example_inputs(2)["frame_features"]
    with torch.no_grad():
        a, b = model.forward_features(x), model.forward_features(perturb_after(x, 3))
    assert (a[:, :4] - b[:, :4]).abs().max() > 1e-3


def test_padding_tokens_do_not_influence_real_tokens_or_pooling():
    model = create_model("text_processor_micro").eval()
    inputs = model.example_inputs(2)  # sample 1 is padded over its last 16 tokens
    ids = inputs["input_ids"].clone()
    ids[1, -16:] = (ids[1, -16:] + 11) % 512
    with torch.no_grad():
        a = model(**inputs)
        b = model(input_ids=ids, attention_mask=inputs["attention_mask"])
        c = model(input_ids=ids)  # without the mask the change is visible
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a[1] - c[1]).abs().max() > 1e-4


def test_bf16_autocast_with_padding_and_causal_mask_is_finite():
    model = create_model("text_decoder_micro").eval()
    inputs = model.example_inputs(2)
    inputs["attention_mask"][0, :5] = False  # left padding: rows with no visible key at all
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert torch.isfinite(out.float()).all()


def test_cross_attention_uses_context_and_its_mask():
    torch.manual_seed(0)
    attn = MultiHeadCrossAttention(16, 2, is_cross_attention=True, context_dimensions=8).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    ctx2 = ctx.clone()
    ctx2[1, 3:] += 5.0  # only masked memory changes
    with torch.no_grad():
        a, b = attn(x, ctx, mask), attn(x, ctx2, mask)
        c = attn(x, ctx2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - c).abs().max() > 1e-4
    with pytest.raises(ValueError):
        attn(x)


@pytest.mark.parametrize("activation,fn", [("gelu", F.gelu), ("silu", F.silu), ("relu", F.relu)])
@pytest.mark.parametrize("gated", [False, True])
def test_feed_forward_network_matches_formula(activation, fn, gated):
    torch.manual_seed(0)
    ffn = FeedForwardNetwork(8, 16, activation, use_gated_linear=gated)
    x = torch.randn(3, 8)
    h = x @ ffn.fc1.weight.T + ffn.fc1.bias
    if gated:
        assert ffn.fc1.out_features == 32  # packed value | gate
        value, gate = h[:, :16], h[:, 16:]
        h = value * fn(gate)  # GEGLU / SwiGLU
    else:
        h = fn(h)
    torch.testing.assert_close(ffn(x), h @ ffn.fc2.weight.T + ffn.fc2.bias)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="tanhh"):
        make_activation("tanhh")
