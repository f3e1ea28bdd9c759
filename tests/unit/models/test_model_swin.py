"""Swin's (shifted-)window attention against a direct per-window reference computation."""

from __future__ import annotations

import math

import pytest
import torch

from heygen_ray.models import PatchMerging, SwinTransformerBlock, WindowedMultiHeadAttention


def reference_swin_attention(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """Attention branch of a Swin block, token by token, from the paper's definition.

    Windows tile the cyclically shifted map; two tokens of a window may attend to each other only
    if the shift did not wrap them around (they are neighbours in the original image), otherwise
    the logit gets -100 (the paper's value). The bias of a pair is table[(dy + w - 1) * (2w - 1) +
    (dx + w - 1)] with (dy, dx) = query - key position inside the window.
    """
    attn = block.attn
    b, h, w, c = x.shape
    ws, s, heads = block.window_size, block.shift_size, attn.num_attention_heads
    hd = c // heads
    table = attn.relative_position_bias_table
    out = torch.zeros_like(x)
    for n in range(b):
        for wy in range(0, h, ws):
            for wx in range(0, w, ws):
                local = [(i, j) for i in range(ws) for j in range(ws)]  # row-major inside the window
                shifted = [(wy + i, wx + j) for i, j in local]  # coordinates in the rolled map
                original = [((y + s) % h, (z + s) % w) for y, z in shifted]
                tokens = torch.stack([x[n, y, z] for y, z in original])  # (N, C)
                qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias  # (N, 3C)
                q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
                heads_out = []
                for hh in range(heads):
                    sl = slice(hh * hd, (hh + 1) * hd)
                    logits = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
                    for a, (ya, xa) in enumerate(local):
                        for bb, (yb, xb) in enumerate(local):
                            dy, dx = ya - yb, xa - xb
                            logits[a, bb] += table[(dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1), hh]
                            oa, ob = original[a], original[bb]
                            wrapped = (oa[0] - ob[0], oa[1] - ob[1]) != (shifted[a][0] - shifted[bb][0], shifted[a][1] - shifted[bb][1])
                            if wrapped:
                                logits[a, bb] += -100.0
                    heads_out.append(torch.softmax(logits, dim=-1) @ v[:, sl])
                y = torch.cat(heads_out, dim=-1) @ attn.proj.weight.T + attn.proj.bias  # (N, C)
                for t, (oy, ox) in enumerate(original):
                    out[n, oy, ox] = y[t]
    return out


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_matches_direct_reference(shift):
    torch.manual_seed(0)
    block = SwinTransformerBlock(16, (8, 8), num_attention_heads=2, window_size=4, shift_size=shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)  # make the bias matter
        x = torch.randn(2, 8, 8, 16)
        out = block(x)
        y = x + reference_swin_attention(block, block.norm1(x))
        ref = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if shift:  # the shift mask is doing something: without it the result differs
        with torch.no_grad():
            block.attn_mask = torch.zeros_like(block.attn_mask)
            assert (block(x) - out).abs().max() > 1e-3


def test_windowed_attention_matches_reference_without_shift():
    torch.manual_seed(1)
    block = SwinTransformerBlock(8, (4, 4), num_attention_heads=2, window_size=2).eval()
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        windows = x.view(1, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(4, 4, 8)
        out = block.attn(windows)
        ref = reference_swin_attention(block, x)
        ref_windows = ref.view(1, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(4, 4, 8)
    torch.testing.assert_close(out, ref_windows, atol=1e-5, rtol=1e-5)
    assert isinstance(block.attn, WindowedMultiHeadAttention)


def test_window_shrinks_and_shift_drops_on_small_maps():
    block = SwinTransformerBlock(8, (4, 4), num_attention_heads=2, window_size=7, shift_size=3)
    assert (block.window_size, block.shift_size) == (4, 0)
    assert block.attn_mask is None


def test_patch_merging_concatenates_the_papers_neighbour_order():
    torch.manual_seed(0)
    merge = PatchMerging(4)
    x = torch.randn(2, 6, 6, 4)
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    ref = merge.reduction(merge.norm(torch.cat([x0, x1, x2, x3], dim=-1)))
    torch.testing.assert_close(merge(x), ref)
    assert merge(x).shape == (2, 3, 3, 8)
