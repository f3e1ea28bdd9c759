"""The optimizer step: accumulation equals one bigger batch; parameter groups; tasks' metrics by hand."""

import contextlib
import copy
import math

import pytest
import torch

from heygen_ray.models import create_model
from heygen_ray.train.loop import optimizer_step, param_groups
from heygen_ray.train.tasks import DataInfo, get_task

NOAMP = contextlib.nullcontext


def video_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randint(0, 256, (n, 8, 32, 32, 3), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, 16, (n,), generator=g)}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_micro_batches_equal_one_big_batch(k):
    task = get_task("video_classification")
    torch.manual_seed(0)
    a = create_model("conv_video_encoder_micro")
    b = copy.deepcopy(a)
    # SGD: the update is proportional to the gradient (Adam's first step is ~lr*sign(g), which
    # amplifies rounding differences of near-zero gradients into different updates)
    opt_a = torch.optim.SGD(param_groups(a, 0.05), lr=0.1)
    opt_b = torch.optim.SGD(param_groups(b, 0.05), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    big = video_batch(4 * k, seed=1)
    micro = [{key: v[i * 4:(i + 1) * 4] for key, v in big.items()} for i in range(k)]
    loss_a, norm_a = optimizer_step(a, a, task, micro, opt_a, scaler, NOAMP, clip_norm=None)
    loss_b, norm_b = optimizer_step(b, b, task, [big], opt_b, scaler, NOAMP, clip_norm=None)
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_clipping_caps_the_update_norm():
    task = get_task("video_classification")
    torch.manual_seed(0)
    m = create_model("conv_video_encoder_micro")
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    _, norm = optimizer_step(m, m, task, [video_batch(4, 2)], opt, torch.amp.GradScaler("cpu", enabled=False), NOAMP, clip_norm=1e-3)
    delta = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(m.parameters(), before)))
    assert norm > 1e-3 and float(delta) == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: update = clipped grad


def test_param_groups_skip_decay_on_vectors():
    m = create_model("vit_micro")
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and any(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    names = {id(p): n for n, p in m.named_parameters()}
    assert all("pos_embed" not in names[id(p)] and "cls_token" not in names[id(p)] for p in decay["params"])


def test_classification_metrics_by_hand():
    task = get_task("video_classification")
    info = DataInfo(num_classes=3)
    state = task.new_metrics(info)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 0, 2])
    task.update_metrics(state, logits, targets)
    m = task.compute_metrics(state)
    assert m["accuracy"] == 0.5 and m["samples"] == 4
    expected = float(torch.nn.functional.cross_entropy(logits, targets))
    assert m["loss"] == pytest.approx(expected)
    assert state["confusion"].tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 0]]  # rows: target, cols: predicted


def test_perplexity_by_hand():
    task = get_task("language_modeling")
    state = task.new_metrics(DataInfo())
    logits = torch.zeros(1, 4, 10)  # uniform over 10 tokens -> perplexity 10
    task.update_metrics(state, logits, torch.tensor([[1, 2, 3, 4]]))
    m = task.compute_metrics(state)
    assert m["loss"] == pytest.approx(math.log(10)) and m["perplexity"] == pytest.approx(10.0)
