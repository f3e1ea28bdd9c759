"""The optimizer step: accumulation equals one bigger batch; parameter groups; tasks' metrics by hand."""

import contextlib
import copy
import math

import pytest
import torch

from heygen_ray.models import create_model
from heygen_ray.train.optim import param_groups
from heygen_ray.train.step import optimizer_step
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
    # GroupNorm: BatchNorm's statistics depend on the micro-batch, so with it no split equals the whole
    a = create_model("conv_video_encoder_micro", norm="group")
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


def test_bf16_autocast_tracks_fp32_training():
    """Same init, same batches: the bf16-autocast loss curve stays within a few percent of fp32."""
    task = get_task("language_modeling")
    g = torch.Generator().manual_seed(0)
    # a learnable stream: each next token is (3 * token + 1) mod 64
    seqs = []
    for _ in range(30):
        tok = torch.randint(0, 64, (8,), generator=g)
        cols = [tok]
        for _ in range(16):
            tok = (3 * tok + 1) % 64
            cols.append(tok)
        seqs.append(torch.stack(cols, 1))  # (8, 17)
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = create_model("text_decoder_micro", vocab_size=64)
        opt = torch.optim.AdamW(param_groups(m, 0.0), lr=3e-3)
        amp = NOAMP if precision == "fp32" else (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        curves[precision] = [
            optimizer_step(m, m, task, [{"input_ids": s[:, :-1], "labels": s[:, 1:]}], opt,
                           torch.amp.GradScaler("cpu", enabled=False), amp, clip_norm=1.0)[0]
            for s in seqs
        ]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-1] < 0.5 * fp32[0]  # it learns
    assert all(abs(a - b) <= 0.05 * a + 0.02 for a, b in zip(fp32, bf16)), list(zip(fp32, bf16))


def test_greedy_generate_follows_the_argmax():
    from heygen_ray.train.tasks import greedy_generate

    class Next(torch.nn.Module):  # logits favour (last token + 1) mod 10
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return torch.nn.functional.one_hot((input_ids + 1) % 10, 10).float() + self.w

    out = greedy_generate(Next(), torch.tensor([[3, 4]]), max_new_tokens=5, max_length=8, stop_id=8)
    assert out.tolist() == [[3, 4, 5, 6, 7, 8]]  # stops after emitting the stop id


def test_resumed_schedule_matches_the_uninterrupted_one():
    from heygen_ray.config import TrainSpec
    from heygen_ray.train.optim import schedule_at

    spec = TrainSpec.from_dict({"steps": 20, "optim": {"lr": 2.0}, "schedule": {"kind": "cosine", "warmup_steps": 5}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = schedule_at(opt, spec, 0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for k in (0, 3, 5, 12, 19):
        opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)  # as if a checkpoint set another lr
        schedule_at(opt2, spec, k)
        assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[k])
    longer = TrainSpec.from_dict({"steps": 40, "optim": {"lr": 2.0}, "schedule": {"kind": "cosine", "warmup_steps": 5}})
    opt3 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule_at(opt3, longer, 19)
    assert opt3.param_groups[0]["lr"] > lrs[19]  # the extended plan decays more slowly


def test_video_quality_by_hand():
    from heygen_ray.train.tasks import video_quality

    target = torch.zeros(2, 3, 4, 16, 16)
    target[:, :, 1::2] = 0.5  # flicker between 0 and 0.5
    same = video_quality(target.clone(), target)
    assert torch.allclose(same["ssim"], torch.ones(2), atol=1e-5) and (same["temporal"] == 0).all()
    shifted = video_quality(target + 0.1, target)  # MSE 0.01 over range 2: PSNR = 10 log10(4 / 0.01) = 26.02 dB
    assert torch.allclose(shifted["psnr"], torch.full((2,), 26.0206), atol=1e-3)
    assert (shifted["temporal"] < 1e-6).all()  # a constant offset keeps the motion
    frozen = video_quality(torch.zeros_like(target), target)  # no flicker predicted: |0 - (+-0.5)| = 0.5
    assert torch.allclose(frozen["temporal"], torch.full((2,), 0.5))


def test_text_to_video_metrics_include_the_mean_clip_baseline():
    info = DataInfo(clip_frames=4, height=16, width=16, caption_tokens=6, vocab_size=50,
                    mean_clip=torch.full((3, 4, 16, 16), 0.25).tolist())
    task = get_task("text_to_video")
    state = task.new_metrics(info)
    target = torch.zeros(2, 3, 4, 16, 16)
    task.update_metrics(state, target + 0.5, target)
    m = task.compute_metrics(state)
    # prediction error 0.5 -> 10 log10(4 / 0.25) = 12.04 dB; the baseline (0.25 off) -> 18.06 dB
    assert m["psnr"] == pytest.approx(12.0412, abs=1e-3) and m["baseline_psnr"] == pytest.approx(18.0618, abs=1e-3)
    assert m["samples"] == 2


def test_hidden_state_distillation_reads_both_models_features_from_their_own_forwards():
    """The student is narrower than the teacher (as after pruning): the similarity-preserving term
    compares their pre-logits features from the very forwards the loss uses, and its gradient
    reaches the student's backbone; hidden_weight = 0 leaves the plain KD + CE loss."""
    from heygen_ray.losses import DistillationLoss, similarity_preserving_loss
    from heygen_ray.train.tasks import DistillationTask

    torch.manual_seed(0)
    teacher = create_model("conv_video_encoder_micro", num_classes=4).eval()
    student = create_model("conv_video_encoder_micro", num_classes=4, stage_channels=(8, 16, 24))
    batch = {"video": torch.randint(0, 256, (3, 8, 32, 32, 3), dtype=torch.uint8), "label": torch.tensor([0, 1, 3])}
    task = DistillationTask(get_task("video_classification"), teacher, temperature=2.0, alpha=0.5, hidden_weight=3.0)
    task.attach_student(student)
    inputs, targets = task.inputs(batch)
    out = student(**inputs)
    loss = task.loss(out, targets)
    with torch.no_grad():
        h_s = student.forward_head(student.forward_features(**inputs), pre_logits=True)
        h_t = teacher.forward_head(teacher.forward_features(**inputs), pre_logits=True)
    assert h_s.shape[1] == 24 and h_t.shape[1] == 64
    base = DistillationLoss(temperature=2.0, alpha=0.5)(out.float(), targets[1], targets[0])[0]
    expected = base + 3.0 * similarity_preserving_loss(h_s, h_t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert similarity_preserving_loss(h_s, h_t).item() > 1e-4  # the term is really there
    loss.backward()
    assert student.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    plain = DistillationTask(get_task("video_classification"), teacher, temperature=2.0, alpha=0.5)
    assert plain.loss(out.detach(), targets).item() == pytest.approx(base.item(), rel=1e-6)


def test_evaluate_scores_every_model_in_one_pass_over_the_batches():
    """The raw and the EMA model are scored in one read of the validation set (a streamed set is
    decoded once per evaluation, not once per model): a one-shot generator gives both the figures
    that scoring each alone over a fresh copy of the batches gives."""
    from heygen_ray.train.step import evaluate

    task = get_task("video_classification")
    info = DataInfo(num_classes=16)
    torch.manual_seed(0)
    a, b = create_model("conv_video_encoder_micro"), create_model("conv_video_encoder_micro")
    batches = [video_batch(4, seed=s) for s in range(3)]
    first = {}
    both = evaluate({"val": a, "val_ema": b}, (x for x in batches), task, info, torch.device("cpu"), NOAMP, first=first)
    for name, model in (("val", a), ("val_ema", b)):
        alone = evaluate({name: model}, iter(batches), task, info, torch.device("cpu"), NOAMP)[name][0]
        assert both[name][0] == pytest.approx(alone) and both[name][0]["samples"] == 12
    assert both["val"][0] != both["val_ema"][0]  # two models, two sets of figures
    torch.testing.assert_close(first["video"], batches[0]["video"])
    assert a.training and b.training  # back in training mode


def test_warm_started_parameters_get_their_own_learning_rate_through_the_schedule():
    """model.init_from.lr_scale: the copied parameters form groups whose learning rate is the
    schedule's times the scale, at every step (schedule_at rebuilds the schedule on resume)."""
    from heygen_ray.config import TrainSpec
    from heygen_ray.train.optim import schedule_at

    model = create_model("text_to_video_sprite_micro")
    copied = {n for n, _ in model.named_parameters() if n.startswith("text.")}
    groups = param_groups(model, 0.05, {n: 0.1 for n in copied})
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter once
    for g in groups:
        in_text = {names[id(p)] in copied for p in g["params"]}
        assert in_text == {g["lr_scale"] == 0.1}  # a group is all copied or all new
        assert (g["weight_decay"] == 0.05) == all(p.ndim >= 2 for p in g["params"])
    assert [g["lr_scale"] for g in param_groups(model, 0.05)] == [1.0, 1.0]  # no scales: the two usual groups
    spec = TrainSpec.from_dict({"name": "s", "task": "text_to_video", "steps": 100,
                                "optim": {"lr": 0.002}, "schedule": {"kind": "cosine", "warmup_steps": 10}})
    opt = torch.optim.AdamW(groups, lr=0.002)
    for step in (0, 10, 55):
        sched = schedule_at(opt, spec, step)
        lrs = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
        assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0]) and lrs[1.0] > 0
    assert sched.get_last_lr()[0] == pytest.approx(opt.param_groups[0]["lr"])


# --- the worker's TrainState, its WorkerConfig and the hooks applied before the loop ---------------

def lm_worker_config(tmp_path, name="rt", **over):
    from heygen_ray.config import TrainSpec
    from heygen_ray.train.worker_config import WorkerConfig

    spec = TrainSpec.from_dict({
        "name": name, "task": "language_modeling", "run_dir": str(tmp_path), "tracking": {"enabled": False},
        "model": {"name": "text_decoder_micro", "overrides": {"hidden_dimensions": 32, "num_layers": 1, "num_attention_heads": 2}},
        "steps": 4, "batch_size": 4, "precision": "fp32", "optim": {"lr": 0.01}, "schedule": {"warmup_steps": 1},
        "ema": {"enabled": True, "decay": 0.9}, "log_every_n_steps": 1, "eval_every_n_steps": 100,
        "checkpoint_every_n_steps": 2, **over})
    info = DataInfo(vocab_size=40, pad_id=0, seq_len=8)
    return WorkerConfig.build(spec=spec, data_info=info, run_dir=str(tmp_path / name), peak_flops={"fp32": 1e9})


class FakeShard:
    """The same batches every epoch (so a resume that restarts its epoch sees what the first run saw)."""

    def __init__(self, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 40, (n, 8), generator=g)
        self.rows = {"input_ids": ids, "labels": ids.roll(-1, 1)}

    def iter_torch_batches(self, batch_size, dtypes=None, drop_last=False, **_):
        n = len(self.rows["input_ids"])
        for i in range(0, n - batch_size + 1 if drop_last else n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.rows.items()}


@pytest.fixture
def fake_ray_train(monkeypatch):
    """One CPU worker of world size 1, in this process: what the loop reports is kept."""
    import types

    import ray.train
    import ray.train.torch

    reports = []
    monkeypatch.setattr(ray.train, "get_context", lambda: types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: FakeShard())
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    return reports


def test_a_resumed_train_state_continues_like_an_uninterrupted_one(tmp_path, fake_ray_train):
    """Two steps, a checkpoint, a new worker: setup + resume restore the model, EMA, optimizer, RNG and
    step from the run's own folder, and the last two steps end where an uninterrupted run ends."""
    from heygen_ray.train import loop
    from heygen_ray.train.checkpoint import latest_checkpoint, read_meta
    from heygen_ray.train.worker_config import WorkerConfig

    whole = loop.train_loop_per_worker(lm_worker_config(tmp_path, "whole").to_dict())
    assert whole["step"] == 4 and whole["resumed_from"] is None and whole["precision"] == "fp32"
    assert [r["step"] for r in fake_ray_train] == [2, 4] and "train_loss" in fake_ray_train[-1]

    cfg = lm_worker_config(tmp_path, "parts")
    state = loop.setup(cfg)
    loop.resume(state)
    loop.start(state)
    assert state.resumed_from is None
    for _ in range(2):
        loop.train_step(state)
    loop.report(state)
    torch.manual_seed(123)  # a new worker: nothing but the checkpoint carries over
    again = loop.setup(WorkerConfig.coerce(cfg.to_dict()))
    loop.resume(again)
    assert (again.step, again.resumed_from, again.epoch) == (2, 2, 0)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(state.optimizer.param_groups[0]["lr"])
    loop.start(again)
    for _ in range(2):
        loop.train_step(again)
    whole_ckpt = latest_checkpoint(lm_worker_config(tmp_path, "whole").checkpoints_root)
    assert read_meta(whole_ckpt).step == 4
    from heygen_ray.train.checkpoint import load_final_weights

    final = load_final_weights(whole_ckpt)
    for k, v in again.final_model.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)
    assert again.optimizer.state_dict()["state"][0]["step"] == 4


def test_worker_config_is_validated_on_the_driver_and_survives_the_trip_to_a_worker(tmp_path):
    import pickle

    from heygen_ray.config import ConfigError
    from heygen_ray.train.worker_config import DistillConfig, WorkerConfig

    cfg = lm_worker_config(tmp_path)
    plain = cfg.to_dict()
    assert set(plain) == {"spec", "data_info", "run_dir", "tracking_uri", "has_val", "train_materialized", "peak_flops", "mlflow_run_id",
                          "init_model", "distill"}
    assert WorkerConfig.coerce(plain) == cfg == pickle.loads(pickle.dumps(cfg)) and WorkerConfig.coerce(cfg) is cfg
    assert cfg.peak_for("fp32") == 1e9 and cfg.peak_for("bf16") == 0.0
    assert cfg.checkpoints_root == str(tmp_path / "rt" / "checkpoints")
    extra = {"init_model": "/m/pruned", "distill": {"teacher": "/m/teacher", "temperature": 2.0, "alpha": 0}}
    d = WorkerConfig.build(spec=cfg.spec, data_info=cfg.data_info, run_dir=cfg.run_dir, extra=extra)
    assert d.distill == DistillConfig(teacher="/m/teacher", temperature=2.0, alpha=0.0) and d.init_model == "/m/pruned"
    assert WorkerConfig.build(spec=cfg.spec, data_info=cfg.data_info, run_dir="r", peak_flops=5.0).peak_for("bf16") == 5.0
    with pytest.raises(ConfigError, match="distil.*did you mean 'distill'"):
        WorkerConfig.build(spec=cfg.spec, data_info=cfg.data_info, run_dir="r", extra={"distil": {}})
    with pytest.raises(ConfigError, match="distill.alpha"):
        WorkerConfig.build(spec=cfg.spec, data_info=cfg.data_info, run_dir="r",
                           extra={"distill": {"teacher": "t", "temperature": 1.0, "alpha": 2.0}})
    with pytest.raises(ConfigError, match="unknown DataInfo fields"):
        WorkerConfig.coerce(dict(plain, data_info={"vocab": 3}))


def test_distillation_and_a_given_start_model_are_applied_before_the_loop(tmp_path):
    """WorkerConfig.init_model replaces the built model; WorkerConfig.distill wraps the task around
    the frozen teacher; without them the spec's model and the plain task."""
    from heygen_ray.config import TrainSpec
    from heygen_ray.tracking.models import save_model_dir
    from heygen_ray.train.prepare import prepare
    from heygen_ray.train.tasks import DistillationTask
    from heygen_ray.train.worker_config import WorkerConfig

    student = create_model("conv_video_encoder_micro", num_classes=4, stage_channels=(8, 16, 24))
    save_model_dir(str(tmp_path / "student"), student, model_name="conv_video_encoder_micro",
                   model_overrides={"num_classes": 4, "stage_channels": [8, 16, 24]})
    teacher = create_model("conv_video_encoder_micro", num_classes=4)
    save_model_dir(str(tmp_path / "teacher"), teacher, model_name="conv_video_encoder_micro", model_overrides={"num_classes": 4})
    spec = TrainSpec.from_dict({"name": "d", "task": "video_classification", "model": {"name": "conv_video_encoder_micro"}})
    info = DataInfo(num_classes=4, clip_frames=8, height=32, width=32)
    plain = prepare(WorkerConfig.build(spec=spec, data_info=info, run_dir=str(tmp_path)), 0, torch.device("cpu"))
    assert type(plain.task).__name__ == "VideoClassification" and plain.lr_scales is None and plain.run_params == {}
    cfg = WorkerConfig.build(spec=spec, data_info=info, run_dir=str(tmp_path), extra={
        "init_model": str(tmp_path / "student"), "distill": {"teacher": str(tmp_path / "teacher"), "temperature": 2.0, "alpha": 0.3}})
    start = prepare(cfg, 0, torch.device("cpu"))
    assert isinstance(start.task, DistillationTask) and start.task.criterion.alpha == 0.3
    assert start.model.training and all(torch.equal(a, b) for a, b in zip(start.model.parameters(), student.parameters()))
    assert not any(p.requires_grad for p in start.task.teacher.parameters())
