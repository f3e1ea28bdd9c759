"""Structured pruning removes real channels/heads (params and FLOPs fall), the pruned model still
trains, its architecture round-trips through model.json; unstructured pruning only zeroes weights."""

import pytest
import torch

from heygen_ray.compress.prune import structured_prune, unstructured_prune
from heygen_ray.models import create_model
from heygen_ray.models.architecture import apply_architecture, architecture

# one intra-op thread, as a 1-CPU Ray worker has: restored after the module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_steps(model, inputs, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.arange(inputs["video"].shape[0]) % model.num_classes
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**inputs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("ratio,round_to", [(0.5, 8), (0.25, None)])
def test_conv3d_channels_removed_about_the_ratio_and_model_still_trains(ratio, round_to):
    torch.manual_seed(0)
    m = create_model("conv_video_encoder_micro")
    x = m.example_inputs(4)
    before = dict(m.named_modules())["blocks.2.conv1"].out_channels
    r = structured_prune(m, x, ratio=ratio, importance="l1", round_to=round_to)
    after = dict(m.named_modules())["blocks.2.conv1"].out_channels
    assert after < before and after % (round_to or 1) == 0
    # a conv chain loses channels on both sides of each layer: about 1 - (1 - ratio)^2 of the weights
    expected = 1 - (1 - ratio) ** 2
    assert abs(r["param_reduction"] - expected) < 0.15, r
    assert r["flop_reduction"] > 0.6 * expected, r
    assert sum(p.numel() for p in m.parameters()) == r["params_after"] < r["params_before"]
    losses = _train_steps(m, x, steps=8)
    assert losses[-1] < losses[0]


def test_transformer_heads_and_ffn_units_removed_residual_width_kept():
    torch.manual_seed(0)
    m = create_model("video_transformer_micro", num_attention_heads=4, embedding_dimensions=64)
    x = m.example_inputs(2)
    r = structured_prune(m, x, ratio=0.5, importance="l2")
    blk = m.blocks[0]
    assert blk.attn.num_attention_heads == 2 and blk.attn.qkv.out_features == 3 * 32  # 2 heads of 16 left
    assert blk.mlp.fc1.out_features == 64 and blk.norm1.normalized_shape == (64,)  # FFN halved, residual kept
    # only the blocks' inner widths shrink, so the reduction is below the ratio but well above zero
    assert 0.25 < r["param_reduction"] < 0.5 and 0.25 < r["flop_reduction"] < 0.5, r
    assert m(**x).shape == (2, m.num_classes)
    losses = _train_steps(m, x, steps=8)
    assert losses[-1] < losses[0]


def test_random_importance_is_the_control_and_differs_from_magnitude():
    a, b = create_model("conv_video_encoder_micro"), create_model("conv_video_encoder_micro")
    b.load_state_dict(a.state_dict())
    x = a.example_inputs(2)
    structured_prune(a, x, ratio=0.5, importance="l2")
    structured_prune(b, x, ratio=0.5, importance="random", seed=1)
    assert a.stem[0].weight.shape == b.stem[0].weight.shape
    assert not torch.equal(a.stem[0].weight, b.stem[0].weight)  # different channels kept


def test_architecture_round_trips_into_a_fresh_preset():
    m = create_model("vit_video_micro")
    x = m.example_inputs(2)
    structured_prune(m, x, ratio=0.5)
    m.eval()
    fresh = create_model("vit_video_micro")
    apply_architecture(fresh, architecture(m))
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    assert torch.equal(fresh(**x), m(**x))


def test_pruned_model_saved_and_loaded_through_model_json(tmp_path):
    from heygen_ray.tracking import load_model
    from heygen_ray.tracking.models import save_model_dir

    m = create_model("conv_video_encoder_micro")
    x = m.example_inputs(2)
    structured_prune(m, x, ratio=0.5)
    m.eval()
    save_model_dir(str(tmp_path / "m"), m, model_name="conv_video_encoder_micro")
    loaded = load_model(str(tmp_path / "m"))
    assert torch.equal(loaded(**x), m(**x))


def test_unstructured_only_zeroes_weights():
    m = create_model("conv_video_encoder_micro")
    shapes = {k: v.shape for k, v in m.state_dict().items()}
    flops = m.flops_per_sample()
    r = unstructured_prune(m, amount=0.5, method="l1")
    assert abs(r["sparsity"] - 0.5) < 0.01 and r["param_reduction"] == 0.0
    assert {k: v.shape for k, v in m.state_dict().items()} == shapes  # nothing removed
    m._flops_cache.clear()
    assert m.flops_per_sample() == flops  # same dense work
    assert "no speed-up" in r["note"]


def test_bad_ratio_is_rejected():
    m = create_model("conv_video_encoder_micro")
    with pytest.raises(ValueError):
        structured_prune(m, m.example_inputs(2), ratio=1.0)


def test_taylor_importance_uses_gradients_of_the_task_loss():
    torch.manual_seed(0)
    m = create_model("conv_video_encoder_micro", num_classes=4)
    x = m.example_inputs(4)
    y = torch.tensor([0, 1, 2, 3])
    loss_fn = torch.nn.functional.cross_entropy
    r = structured_prune(m, x, ratio=0.5, importance="taylor", taylor_batches=[(x, y)], loss_fn=loss_fn)
    assert r["params_after"] < r["params_before"]
    assert all(p.grad is None for p in m.parameters())  # the saliency pass leaves no gradients behind
    with pytest.raises(ValueError, match="taylor"):
        structured_prune(create_model("conv_video_encoder_micro"), x, ratio=0.5, importance="taylor")
