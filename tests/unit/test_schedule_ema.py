"""LR schedules and EMA against hand-computed values."""

import math

import pytest
import torch

from heygen_ray.train.ema import ema_decay, make_ema
from heygen_ray.train.schedule import build_scheduler


def lrs(kind, total=20, warmup=5, f=0.1, min_ratio=0.1, peak=2.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    sched = build_scheduler(opt, kind=kind, total_steps=total, warmup_steps=warmup, warmup_start_factor=f, min_lr_ratio=min_ratio)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def expected(kind, s, total=20, warmup=5, f=0.1, min_ratio=0.1, peak=2.0):
    if s < warmup:
        return peak * (f + (1 - f) * s / warmup)
    t = (s - warmup) / (total - warmup)
    lo = peak * min_ratio
    if kind == "cosine":
        return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "linear":
        return peak * (1 - (1 - min_ratio) * min(t, 1.0))
    return peak


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_match_the_formula(kind):
    got = lrs(kind)
    for s, lr in enumerate(got):
        assert lr == pytest.approx(expected(kind, s), rel=1e-6, abs=1e-9), (kind, s)
    assert got[0] == pytest.approx(0.2) and got[5] == pytest.approx(2.0)


def test_no_warmup_and_bad_arguments():
    got = lrs("cosine", warmup=0)
    assert got[0] == pytest.approx(2.0) and got[20] == pytest.approx(0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        build_scheduler(opt, kind="cosine", total_steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(opt, kind="step", total_steps=5)


def test_scheduler_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    a = build_scheduler(opt, kind="cosine", total_steps=10, warmup_steps=3)
    for _ in range(4):
        opt.step()
        a.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    b = build_scheduler(opt2, kind="cosine", total_steps=10, warmup_steps=3)
    opt2.load_state_dict(opt.state_dict())
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        opt.step()
        a.step()
        opt2.step()
        b.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])


def test_ema_follows_the_formula_with_warmup():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, decay=0.9, warmup=True)  # construction copies the weights
    values = [1.0, 2.0, 4.0, -3.0, 0.5]
    with torch.no_grad():
        model.weight.fill_(values[0])
    ema.update_parameters(model)  # first update: copy
    ref = values[0]
    for n, v in enumerate(values[1:], start=1):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update_parameters(model)
        d = min(0.9, (1 + n) / (10 + n))
        ref = d * ref + (1 - d) * v
        assert float(ema.module.weight.detach()) == pytest.approx(ref, rel=1e-6)
    assert ema_decay(0.999, 0, True) == pytest.approx(0.1) and ema_decay(0.999, 10_000, True) == 0.999
    assert ema_decay(0.99, 0, False) == 0.99
