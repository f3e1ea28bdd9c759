"""The composite text-to-video chain, and a guard that FLOP counting leaves every model intact."""

import pytest
import torch

from heygen_ray.models import create_model, list_models


@pytest.mark.parametrize("name", list_models("_micro"))
def test_flop_count_leaves_parameters_where_they_were(name):
    model = create_model(name)
    model.flops_per_sample()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} <= {"cpu"}
    model(**model.example_inputs(2))  # still runs on real tensors


def test_text_to_video_depends_on_the_caption():
    torch.manual_seed(0)
    model = create_model("text_to_video_micro", vocab_size=50, max_sequence_length=8).eval()
    ids = torch.randint(3, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
        b = model(input_ids=ids.flip(0), attention_mask=mask)
        masked = ids.clone()
        masked[:, 6:] = 0
        short = torch.ones(2, 8, dtype=torch.bool)
        short[:, 6:] = False
        c = model(input_ids=ids, attention_mask=short)
        d = model(input_ids=masked, attention_mask=short)
    assert a.shape == (2, 3, 8, 32, 32) and a.abs().max() <= 1.0
    torch.testing.assert_close(b, a.flip(0))  # each sample follows its own caption
    assert not torch.allclose(a[0], a[1], atol=1e-4)
    torch.testing.assert_close(c, d)  # padded positions do not matter


def test_text_to_video_conditions_on_output_tokens_beside_word_embeddings():
    """condition_tokens="output+embedding": the generator sees the text tower's outputs and its
    (layer-normalised) word + position embeddings, so a word's identity reaches it even through a
    frozen tower; a caption differing in one word changes the clip."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model("text_to_video_sprite_micro").eval()
    inputs = model.example_inputs(2)
    with torch.no_grad():
        cond = model.condition(**inputs)
        tokens = model.text.forward_features(**inputs)
        words = model.text.embed(inputs["input_ids"])
        assert cond.shape == (2, inputs["input_ids"].shape[1], 2 * tokens.shape[-1])
        torch.testing.assert_close(cond[..., :tokens.shape[-1]], tokens)
        torch.testing.assert_close(cond[..., tokens.shape[-1]:], F.layer_norm(words, words.shape[-1:]))
        other = dict(inputs, input_ids=inputs["input_ids"].clone())
        other["input_ids"][:, 1] = (other["input_ids"][:, 1] + 1) % model.text.vocab_size
        assert not torch.allclose(model(**other), model(**inputs))
    with pytest.raises(ValueError, match="condition_tokens"):
        create_model("text_to_video_sprite_micro", condition_tokens="words")
    with pytest.raises(ValueError, match="text_projection=None"):
        create_model("text_to_video_sprite_micro", text_projection="mlp")


@pytest.mark.parametrize("name", ["video_text_matching_micro", "video_text_matching_cnn_micro"])
def test_matching_embeddings_stay_fp32_under_bf16_autocast(name):
    """The towers run in bf16 under autocast; the unit embeddings every similarity is taken of do not
    (bf16 rounding of cosines, times a logit scale up to 100, drowned the gaps between captions)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = model.example_inputs(4)
    with torch.inference_mode(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        _, _, v, t = model.encode(**x)
        out = model(**x, outputs="all")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on here
    assert v.dtype == t.dtype == torch.float32 and out["video_embeddings"].dtype == torch.float32
    with torch.inference_mode():
        _, _, v32, t32 = model.encode(**x)
    # the same embeddings as fp32 up to the towers' bf16 error, and unit length to fp32 precision
    assert torch.allclose(v.norm(dim=-1), torch.ones(4), atol=1e-6) and torch.allclose(t.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert float((v - v32).abs().max()) < 0.05 and float((t - t32).abs().max()) < 0.05
