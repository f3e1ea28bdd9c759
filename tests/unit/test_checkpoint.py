"""The checkpoint format: a full round trip continues training bit-for-bit; loading refuses pickles."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from heygen_ray.train.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from heygen_ray.train.ema import make_ema
from heygen_ray.train.schedule import build_scheduler


def parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_scheduler(opt, kind="cosine", total_steps=20, warmup_steps=3)
    ema = make_ema(model, 0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, sched, ema, scaler


def step(model, opt, sched, ema):
    x = torch.randn(5, 4)  # consumes the torch RNG: resumed runs must draw the same numbers
    loss = model(x).pow(2).mean() + 0.01 * random.random() + 0.01 * float(np.random.rand())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    ema.update_parameters(model)
    return float(loss.detach())


def test_resume_continues_identically(tmp_path):
    model, opt, sched, ema, scaler = parts()
    for _ in range(4):
        step(model, opt, sched, ema)
    save_checkpoint(str(tmp_path / "ck"), model=model, ema=ema, optimizer=opt, scheduler=sched, scaler=scaler,
                    step=4, epoch=1, data_position={"epoch": 1, "batch": 7}, spec={"a": {"b": 1}})
    reference = [step(model, opt, sched, ema) for _ in range(3)]

    model2, opt2, sched2, ema2, scaler2 = parts(seed=123)  # different init: everything must come from disk
    meta = load_checkpoint(str(tmp_path / "ck"), model=model2, ema=ema2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert meta.step == 4 and meta.epoch == 1 and meta.data_position == {"epoch": 1, "batch": 7} and meta.spec == {"a": {"b": 1}}
    resumed = [step(model2, opt2, sched2, ema2) for _ in range(3)]
    assert resumed == reference
    for a, b in zip(ema.parameters(), ema2.parameters()):
        assert torch.equal(a, b)


def test_files_are_safetensors_json_and_a_weights_only_state(tmp_path):
    model, opt, sched, ema, scaler = parts()
    d = save_checkpoint(str(tmp_path / "ck"), model=model, ema=ema, optimizer=opt, scheduler=sched, step=1,
                        modules={"disc": torch.nn.Linear(2, 1)})
    assert sorted(os.listdir(d)) == ["ema.safetensors", "extra", "meta.json", "model.safetensors", "state.pt"]
    assert json.load(open(f"{d}/meta.json"))["schema_version"] == 1
    # a state.pt that smuggles an arbitrary object is refused by the weights-only loader
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"optimizer": Evil()}, f"{d}/state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(d, model=model, optimizer=opt)


def test_mismatched_model_and_schema_errors(tmp_path):
    model, opt, sched, ema, scaler = parts()
    d = save_checkpoint(str(tmp_path / "ck"), model=model, step=1)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(d, model=torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(d, model=model, ema=ema)
    meta = json.load(open(f"{d}/meta.json"))
    meta["schema_version"] = 99
    json.dump(meta, open(f"{d}/meta.json", "w"))
    with pytest.raises(CheckpointError, match="schema 99"):
        read_meta(d)
    with pytest.raises(CheckpointError, match="not a heygen_ray checkpoint"):
        read_meta(str(tmp_path))
