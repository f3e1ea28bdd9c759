"""The checkpoint format: a full round trip continues training bit-for-bit; loading refuses pickles."""

import contextlib
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


def test_load_final_weights_takes_the_ema_when_there_is_one_else_the_raw_model(tmp_path):
    """A checkpoint directory, the run's checkpoints folder or the run directory: the newest complete
    checkpoint's EMA weights (AveragedModel prefix and counter stripped) or, without EMA, the raw ones;
    the result loads strictly into the bare model."""
    from heygen_ray.train.checkpoint import checkpoints_root, commit_checkpoint, load_final_weights

    model, opt, sched, ema, scaler = parts()
    for _ in range(3):
        step(model, opt, sched, ema)
    run = str(tmp_path / "run")
    commit_checkpoint(checkpoints_root(run), 3, model=model, step=1)  # older, without EMA
    newest = commit_checkpoint(checkpoints_root(run), 3, model=model, ema=ema, step=2)
    os.makedirs(os.path.join(checkpoints_root(run), "step_00000009.tmp"))  # a crashed write is never read
    for path in (newest, checkpoints_root(run), run):
        state = load_final_weights(path)
        assert set(state) == set(model.state_dict())
        for k, v in ema.module.state_dict().items():
            assert torch.equal(state[k], v)
    assert not torch.equal(load_final_weights(newest)["0.weight"], model.state_dict()["0.weight"])
    raw = load_final_weights(os.path.join(checkpoints_root(run), "step_00000001"))
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    fresh.load_state_dict(load_final_weights(run), strict=True)
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        load_final_weights(str(tmp_path / "nothing"))


def test_checkpoint_parts_save_everything_and_restore_all_but_the_schedule(tmp_path):
    """The scheduler is saved for inspection; a resume rebuilds the schedule from the step instead."""
    from heygen_ray.train.checkpoint import CheckpointParts

    model, opt, sched, ema, scaler = parts()
    p = CheckpointParts(model=model, ema=ema, optimizer=opt, scheduler=sched, scaler=scaler)
    d = save_checkpoint(str(tmp_path / "ck"), step=3, **p.to_save())
    assert "scheduler" in torch.load(f"{d}/state.pt", weights_only=True)
    assert "scheduler" not in p.to_restore() and p.to_restore()["optimizer"] is opt
    assert load_checkpoint(d, **p.to_restore()).step == 3


def test_the_gan_discriminator_travels_in_the_checkpoint_with_its_optimizer_and_scaler(tmp_path):
    from heygen_ray.config import TrainSpec
    from heygen_ray.train.checkpoint import DISCRIMINATOR_OPTIMIZER, DISCRIMINATOR_SCALER, CheckpointParts
    from heygen_ray.train.gan import Adversary
    from heygen_ray.train.prepare import task_for

    spec = TrainSpec.from_dict({"name": "g", "task": "text_to_video", "steps": 10, "loss": {"adversarial_loss_weight": 0.1},
                                "discriminator": {"base_channels": 4, "num_layers": 2, "schedule": {"kind": "linear"}}})

    def adversary(seed):
        torch.manual_seed(seed)
        return Adversary.build(task_for(spec), spec, torch.device("cpu"), fp16=False)

    assert Adversary.build(task_for(TrainSpec.from_dict({"name": "n", "task": "text_to_video"})), spec,
                           torch.device("cpu"), fp16=False) is None  # no adversarial weight: no GAN
    adv = adversary(0)
    task = task_for(spec)
    real, fake = torch.rand(2, 3, 4, 16, 16) * 2 - 1, torch.rand(2, 3, 4, 16, 16) * 2 - 1
    stats = adv.step(task, [(fake, real)], contextlib.nullcontext)
    assert set(stats) == {"d_loss", "d_real", "d_fake", "d_grad_norm", "d_lr"}
    assert adv.optimizer.param_groups[0]["lr"] < stats["d_lr"]  # its own linear schedule stepped
    p = CheckpointParts(model=torch.nn.Linear(2, 2))
    adv.add_checkpoint_parts(p)
    d = save_checkpoint(str(tmp_path / "ck"), step=1, **p.to_save())
    assert os.listdir(f"{d}/extra") == ["discriminator.safetensors"]
    state = torch.load(f"{d}/state.pt", weights_only=True)
    assert {f"extra_{DISCRIMINATOR_OPTIMIZER}", f"extra_{DISCRIMINATOR_SCALER}"} <= set(state)

    again = adversary(1)  # other weights, an empty optimizer: everything must come from disk
    q = CheckpointParts(model=torch.nn.Linear(2, 2))
    again.add_checkpoint_parts(q)
    load_checkpoint(d, **q.to_restore())
    for a, b in zip(adv.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert again.optimizer.state_dict()["state"][0]["step"] == 1
    again.schedule_at(1)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(adv.optimizer.param_groups[0]["lr"])
