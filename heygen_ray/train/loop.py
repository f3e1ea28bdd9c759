"""The per-worker training loop (runs inside Ray Train's TorchTrainer workers).

DDP (gloo on CPU, nccl on GPU) through ``ray.train.torch.prepare_model``; data from
``get_dataset_shard``; AMP (bf16 autocast, or fp16 + GradScaler on CUDA); gradient accumulation with
``no_sync`` on micro-steps; clipping; AdamW with decay / no-decay groups; warmup + schedule stepped per
optimizer step; EMA; checkpoints every N steps in the one checkpoint format; resume from the latest
checkpoint after a worker failure or when a job with the same name is re-run; optional fault injection.
Rank 0 logs to MLflow; other ranks get a null tracker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from heygen_ray.config import ConfigError, TrainSpec
from heygen_ray.train.checkpoint import commit_checkpoint, latest_checkpoint, load_checkpoint, read_meta
from heygen_ray.train.ema import make_ema
from heygen_ray.train.precision import PrecisionChoice, probe_bf16_speedup, read_choice, resolve_precision, write_choice
from heygen_ray.train.precision import amp_dtype as precision_dtype
from heygen_ray.train.schedule import build_scheduler
from heygen_ray.train.tasks import DataInfo, Task, get_task

log = logging.getLogger(__name__)

FAULT_ENV = "HEYGEN_FAULT"  # "rank:step": kill that rank at that optimizer step (first attempt only)


def param_groups(model: nn.Module, weight_decay: float, lr_scales: Optional[Mapping[str, float]] = None) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights, embeddings, tokens and position tables
    (every parameter with fewer than 2 dims, plus names that say so). ``lr_scales``: parameter name
    -> learning-rate multiplier (warm-started weights fine-tuned gently); each group carries its
    ``lr_scale`` (1.0 by default), which `schedule_at` applies."""
    groups: Dict[Tuple[bool, float], List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "relative_position_bias_table", "embedding", "rel_bias"))
        scale = float((lr_scales or {}).get(name, 1.0))
        groups.setdefault((not skip, scale), []).append(p)
    out = []
    for decay in (True, False):  # the decayed group first, as before (checkpointed optimizer states)
        for (d, scale), params in sorted(groups.items(), key=lambda kv: -kv[0][1]):
            if d == decay:
                out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
    return out


def model_overrides(spec: TrainSpec, task: Task, info: DataInfo) -> Dict[str, Any]:
    """What the data dictates (classes, vocabulary, clip shape), then the YAML's own overrides."""
    return {**task.model_overrides(info), **spec.model.overrides}


def build_model(spec: TrainSpec, task: Task, info: DataInfo) -> nn.Module:
    from heygen_ray.models import create_model

    return create_model(spec.model.name, **model_overrides(spec, task, info))


def apply_init_from(model: nn.Module, spec: TrainSpec, tracking_uri: Optional[str]):
    """Warm-start ``model`` from ``spec.model.init_from`` (None when unset); fails, naming the field,
    when not one tensor of the source fits."""
    from heygen_ray.train.warm_start import warm_start

    init = spec.model.init_from
    if init is None:
        return None
    from heygen_ray.tracking import load_model

    try:
        source = load_model(init.uri, tracking_uri=tracking_uri).state_dict()
    except Exception as err:  # noqa: BLE001 (any failure to reach or read the source is the config's)
        raise ConfigError(f"model.init_from.uri: cannot load {init.uri!r}: {err}") from None
    report = warm_start(model, source, source_prefix=init.source_prefix, target_prefix=init.target_prefix,
                        freeze=init.freeze)
    if not report.copied:
        raise ConfigError(
            f"model.init_from: no tensor of {init.uri} (names under {init.source_prefix!r}) matches a tensor of "
            f"{spec.model.name} under {init.target_prefix!r} with the same shape "
            f"({len(report.shape_mismatch)} names matched with other shapes)")
    return report


def load_judge(spec: TrainSpec, info: DataInfo, tracking_uri: Optional[str], device: Optional[torch.device] = None):
    """The text_to_video judge of ``spec.judge`` (a registered video classifier) as a tasks.Judge."""
    from heygen_ray.config import COLORS
    from heygen_ray.tracking import load_model_and_config, recorded_data_info
    from heygen_ray.train.tasks import Judge

    model, cfg = load_model_and_config(spec.judge.model, tracking_uri=tracking_uri)
    labels = recorded_data_info(cfg).get("label_names")
    if not labels:
        raise ConfigError(f"judge.model: {spec.judge.model} records no label names (train it with the video_classification task)")
    return Judge(model.to(device or "cpu"), labels, COLORS, info.tokenizer_dir)


def task_for(spec: TrainSpec, judge: Any = None) -> Task:
    """The task with the spec's loss settings (the discriminator, when the GAN is on, is built here;
    ``judge``: the loaded text_to_video judge, see load_judge)."""
    if spec.task == "text_to_video":
        return get_task(spec.task, loss_weights=spec.loss.to_dict(), discriminator=spec.discriminator.to_dict(),
                        judge=judge, judged=spec.judge is not None)
    if spec.task == "video_text_matching":
        return get_task(spec.task, **spec.matching_loss.to_dict())
    return get_task(spec.task)


def fault_plan(spec: TrainSpec) -> Optional[Tuple[int, int]]:
    if spec.fault is not None:
        return spec.fault.rank, spec.fault.step
    env = os.environ.get(FAULT_ENV)
    if env:
        rank, step = env.split(":")
        return int(rank), int(step)
    return None


def choose_precision(spec: TrainSpec, model: nn.Module, task: Task, info: DataInfo, device: torch.device,
                     world: int, record: Optional[str] = None) -> PrecisionChoice:
    """Resolve ``spec.precision`` (``auto``: CPU flags, then a probe of this model's own step at
    the training batch size). Rank 0 decides and every rank takes its answer, so all workers train
    alike. ``record``: a file where rank 0 keeps the run's choice; a later attempt of the run (a
    retry after a failure, a resume) takes it from there instead of probing again, so it trains in
    the precision its checkpoints were made in and logs the same run params."""
    import torch.distributed as dist

    shared = world > 1 and spec.precision == "auto"
    rank = dist.get_rank() if shared else 0
    choice: Optional[PrecisionChoice] = None
    if rank == 0:
        choice = read_choice(record, spec.precision) if record else None
        if choice is None:
            choice = _resolve(spec, model, task, info, device)
            if record:
                write_choice(record, choice)
    if shared:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    if spec.precision == "auto":
        log.warning("precision auto -> %s (%s)", choice.precision, choice.reason)
    return choice


def _resolve(spec: TrainSpec, model: nn.Module, task: Task, info: DataInfo, device: torch.device) -> PrecisionChoice:
    batch = {k: v.to(device) for k, v in task.example_batch(info, spec.batch_size).items()}
    inputs, _ = task.inputs(batch)
    inputs = {**inputs, **task.forward_kwargs}

    def surrogate(out: Any) -> torch.Tensor:
        # the probe times the model's forward and backward; a task loss may involve more than the
        # model (a GAN's discriminator), so every float output is reduced the same way instead
        if isinstance(out, torch.Tensor):
            return out.float().pow(2).mean()
        values = out.values() if isinstance(out, Mapping) else out
        return sum(v.float().pow(2).mean() for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())

    def probe() -> float:
        return probe_bf16_speedup(model, inputs, surrogate, device.type)

    try:
        return resolve_precision(spec.precision, device, probe=probe)
    except RuntimeError as err:  # a model the probe cannot run in bf16 trains in fp32
        return PrecisionChoice("fp32", spec.precision, f"bf16 probe failed: {str(err).splitlines()[0][:200]}")


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@torch.no_grad()
def evaluate(models: Mapping[str, nn.Module], batches, task: Task, info: DataInfo, device: torch.device, amp,
             first: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Tuple[Dict[str, float], Dict[str, Any]]]:
    """(metrics, state) of each model over ``batches``, in one pass: the validation set is read (and,
    when streamed, decoded) once for the raw and the EMA model. An empty ``first`` dict receives the
    first batch (kept for samples)."""
    training = [m for m in models.values() if m.training]  # restored after; a loaded (eval) model stays so
    for m in training:
        m.eval()
    states = {name: task.new_metrics(info) for name in models}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if first is not None and not first:
            first.update(batch)
        inputs, targets = task.inputs(batch)
        for name, m in models.items():
            with amp():
                out = m(**inputs, **task.forward_kwargs)
            task.update_metrics(states[name], out, targets, batch)
    for m in training:
        m.train()
    return {name: (task.compute_metrics(st), st) for name, st in states.items()}


def _batches(shard, spec: TrainSpec, task: Task, epoch_start: int) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
    """Endless micro-batches, epoch after epoch (each epoch re-executes the Ray dataset)."""
    epoch = epoch_start
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=spec.batch_size, dtypes=dict(task.dtypes), drop_last=True,
                                               local_shuffle_buffer_size=max(spec.batch_size * 4, 64),
                                               local_shuffle_seed=spec.seed + epoch):
            n += 1
            yield epoch, batch
        if n == 0:
            raise RuntimeError(f"the training shard yielded no full batch of {spec.batch_size}: lower batch_size")
        epoch += 1


def schedule_at(opt: torch.optim.Optimizer, spec: TrainSpec, step: int, optim: Any = None, schedule: Any = None):
    """A fresh scheduler for the current spec, advanced to ``step``. The LR is a function of the step
    and the plan, so a resumed job that extends ``steps`` follows its new plan (a restored scheduler
    state would keep the old horizon). ``optim``/``schedule``: another optimizer's sections (the
    discriminator's); default the model's."""
    import warnings

    optim, schedule = optim or spec.optim, schedule or spec.schedule
    for group in opt.param_groups:
        group["lr"] = optim.lr * group.get("lr_scale", 1.0)
        group.pop("initial_lr", None)
    sched = build_scheduler(opt, kind=schedule.kind, total_steps=spec.steps, warmup_steps=schedule.warmup_steps,
                            warmup_start_factor=schedule.warmup_start_factor, min_lr_ratio=schedule.min_lr_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(step):
            sched.step()
    return sched


def optimizer_step(model: nn.Module, base: nn.Module, task: Task, micro_batches: List[Dict[str, torch.Tensor]],
                   opt: torch.optim.Optimizer, scaler: Any, amp, clip_norm: Optional[float], *, step: Optional[int] = None,
                   collect: Optional[List[Tuple[Any, torch.Tensor]]] = None) -> Tuple[float, float]:
    """One optimizer step over ``len(micro_batches)`` accumulated micro-batches.

    Each micro-loss is divided by the number of micro-batches, so the update equals the one of a
    single batch k times larger; under DDP the gradient all-reduce runs only on the last micro-batch
    (``no_sync`` on the others). ``collect`` receives each micro-batch's (detached output, targets)
    (a GAN's discriminator step reuses them). Returns (mean micro-batch loss, gradient norm before
    clipping).
    """
    k = len(micro_batches)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        inputs, targets = task.inputs(batch)
        last = i == k - 1
        sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with amp():
                out = model(**inputs, **task.forward_kwargs)
            loss = task.loss(out, targets, step=step) / k
            scaler.scale(loss).backward()
        if collect is not None:
            collect.append((task.prediction(out).detach(), targets))
        total += float(loss.detach()) * k
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), clip_norm or float("inf"))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return total / k, float(grad_norm)


@contextlib.contextmanager
def frozen(module: Optional[nn.Module]):
    """No gradients into ``module``'s parameters inside the block (the discriminator during the
    generator's step: its weights must not move, and under DDP no gradient hook may fire)."""
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def discriminator_step(d_model: nn.Module, d_base: nn.Module, task: Task, pairs: List[Tuple[torch.Tensor, torch.Tensor]],
                       opt: torch.optim.Optimizer, scaler: Any, amp, clip_norm: Optional[float]) -> Dict[str, float]:
    """One discriminator update on the generator's (detached output, real clip) pairs of this step,
    accumulated like :func:`optimizer_step`. Returns the mean hinge loss, logits and gradient norm."""
    k = len(pairs)
    sums: Dict[str, float] = {}
    for i, (fake, real) in enumerate(pairs):
        sync = d_model.no_sync() if (i < k - 1 and hasattr(d_model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with amp():
                loss, parts = task.discriminator_loss(fake, real, d_model)
            scaler.scale(loss / k).backward()
        for name, v in parts.items():
            sums[name] = sums.get(name, 0.0) + float(v) / k
    scaler.unscale_(opt)
    sums["d_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(d_base.parameters(), clip_norm or float("inf")))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return sums


def train_loop_per_worker(config: Dict[str, Any]) -> Dict[str, Any]:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from heygen_ray.models import unwrap_model
    from heygen_ray.train import track

    spec = TrainSpec.from_dict(config["spec"])  # re-validated on arrival
    info = DataInfo(**config["data_info"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # only rank 0 evaluates, so only rank 0 loads a judge
    judge = load_judge(spec, info, config.get("tracking_uri"), device) if spec.judge is not None and rank == 0 else None
    task = task_for(spec, judge)
    torch.manual_seed(spec.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)

    warm = None
    if config.get("init_model"):  # a given starting point (the pruned student), e.g. of another shape
        from heygen_ray.tracking import load_model

        model = load_model(config["init_model"]).train().to(device)
    else:
        model = build_model(spec, task, info)
        warm = apply_init_from(model, spec, config.get("tracking_uri"))
        model = model.to(device)
    if config.get("distill"):  # the frozen teacher: outside DDP, not checkpointed with the student
        from heygen_ray.train.tasks import DistillationTask
        from heygen_ray.tracking import load_model

        d = config["distill"]
        task = DistillationTask(task, load_model(d["teacher"]).to(device), d["temperature"], d["alpha"],
                                d.get("hidden_weight", 0.0))
    if spec.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = make_ema(model, spec.ema.decay, spec.ema.warmup) if spec.ema.enabled else None
    if hasattr(task, "attach_student"):
        task.attach_student(model)
    scales = None
    if warm is not None and spec.model.init_from.lr_scale != 1.0:
        scales = {name: spec.model.init_from.lr_scale for name in warm.copied}
    opt = torch.optim.AdamW(param_groups(model, spec.optim.weight_decay, scales), lr=spec.optim.lr,
                            betas=(spec.optim.beta1, spec.optim.beta2), eps=spec.optim.eps)
    sched = schedule_at(opt, spec, 0)
    choice = choose_precision(spec, model, task, info, device, world, os.path.join(config["run_dir"], "precision.json"))
    precision = choice.precision
    use_fp16 = precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
    # GAN: the discriminator (built by the task) has its own optimizer, schedule and grad scaler
    disc = task.discriminator.to(device) if task.discriminator is not None else None
    d_opt = d_sched = d_scaler = None
    if disc is not None:
        d_spec = spec.discriminator
        d_opt = torch.optim.AdamW(param_groups(disc, d_spec.optim.weight_decay), lr=d_spec.optim.lr,
                                  betas=(d_spec.optim.beta1, d_spec.optim.beta2), eps=d_spec.optim.eps)
        d_sched = schedule_at(d_opt, spec, 0, d_spec.optim, d_spec.schedule)
        d_scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
    amp_dtype = precision_dtype(precision)

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    # Resume from the newest checkpoint Ray Train knows of, or the newest complete one in our own
    # folder: Ray registers a reported checkpoint when its controller next polls the workers, so a
    # worker that dies right after reporting can leave Ray one checkpoint behind.
    step, epoch, resumed_from = 0, 0, None
    own_root = os.path.join(config["run_dir"], "checkpoints")
    own = latest_checkpoint(own_root)
    own_step = read_meta(own).step if own is not None else -1
    # the GAN's discriminator and its optimizer state travel in every checkpoint beside the model's
    gan_parts: Dict[str, Any] = {} if disc is None else dict(
        modules={"discriminator": disc}, optimizers={"discriminator_optimizer": d_opt, "discriminator_scaler": d_scaler})
    parts: Dict[str, Any] = dict(model=model, ema=ema, optimizer=opt, scaler=scaler, **gan_parts)
    meta, source = None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:  # opened once: on remote storage this is a download
            if read_meta(d).step >= own_step:
                meta, source = load_checkpoint(d, **parts), "ray"
    if meta is None and own is not None:
        meta, source = load_checkpoint(own, **parts), "own"
    if meta is not None:
        step, epoch, resumed_from = meta.step, int(meta.data_position.get("epoch", 0)), meta.step
        log.warning("[rank %d] resumed from step %d (epoch %d, %s checkpoint)", rank, step, epoch, source)
        sched = schedule_at(opt, spec, step)
        if disc is not None:
            d_sched = schedule_at(d_opt, spec, step, spec.discriminator.optim, spec.discriminator.schedule)

    base = model
    model = ray.train.torch.prepare_model(model)
    d_model = ray.train.torch.prepare_model(disc) if disc is not None else None
    if spec.compile:
        model = torch.compile(model)
    tracker = track.attach(spec.tracking.to_dict(), config["run_dir"], rank=rank, run_id=config.get("mlflow_run_id"))
    if resumed_from is None:  # a resumed run logged its choice already (a retry logs the same values again)
        tracker.log_params(choice.to_params())
        if warm is not None:
            tracker.log_params({"init_from": spec.model.init_from.uri, **warm.summary()})
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    flops = unwrap_model(base).flops_per_sample(task.inputs(task.example_batch(info, 1))[0])
    n_params = sum(p.numel() for p in base.parameters())
    unit_name, units = task.units_per_sample(info)
    peaks = config.get("peak_flops") or {}
    peak = spec.peak_flops or float((peaks.get(precision) if isinstance(peaks, dict) else peaks) or 0.0)
    fault = fault_plan(spec)
    fault_marker = os.path.join(config["run_dir"], f".fault-{spec.name}")

    history: Dict[str, List[Tuple[int, float]]] = {}
    def new_window() -> Dict[str, float]:  # sums over the optimizer steps since the last log line
        return {"loss": 0.0, "samples": 0, "wait": 0.0, "t0": time.perf_counter(), "grad_norm": 0.0, "steps": 0}

    window = new_window()
    last_eval: Dict[str, float] = {}
    last_train: Dict[str, float] = {}
    data = _batches(shard, spec, task, epoch)
    batches_in_epoch = 0
    model.train()

    media_batch: Dict[str, torch.Tensor] = {}  # filled by the first evaluation

    def run_eval(final: bool = False) -> None:
        """Rank 0 only (no collective): exact metrics on the unsplit validation set, raw and EMA."""
        nonlocal last_eval
        if val_shard is None or rank != 0:
            return
        models = {"val": base} if ema is None else {"val": base, "val_ema": ema.module}
        res = evaluate(models, val_shard.iter_torch_batches(batch_size=spec.batch_size, dtypes=dict(task.dtypes)),
                       task, info, device, amp, first=media_batch)
        last_eval = {f"{prefix}_{k}": v for prefix, (metrics, _) in res.items() for k, v in metrics.items()}
        state = res["val_ema" if ema is not None else "val"][1]
        tracker.log_metrics(last_eval, step)
        for k, v in last_eval.items():
            history.setdefault(k, []).append((step, v))
        if final and "confusion" in state:
            tracker.log_confusion_matrix(state["confusion"].tolist(), info.label_names, "confusion_matrix")
        log_media()

    def log_media() -> None:
        """Rank 0: what the model (EMA when on) makes of a fixed set of validation examples, as files in
        <run_dir>/samples/step_XXXXXXXX/ and the MLflow artifacts samples/step_XXXXXXXX/."""
        if type(task).media is Task.media or not media_batch:
            return
        n = getattr(task, "MEDIA_SAMPLES", 4)  # the first validation rows, the same at every evaluation
        fixed = {k: v[:n] for k, v in media_batch.items()}
        files = task.media(ema.module if ema is not None else base, fixed, info)
        if not files:
            return
        folder = os.path.join(config["run_dir"], "samples", f"step_{step:08d}")
        os.makedirs(folder, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        tracker.log_artifact(folder, f"samples/step_{step:08d}")
        media_dirs.append(folder)

    media_dirs: List[str] = []

    def report() -> None:
        """Every rank (a barrier): metrics, and rank 0's checkpoint."""
        metrics: Dict[str, Any] = {"step": step, "epoch": epoch, "model_gflops": flops / 1e9, "model_params_m": n_params / 1e6}
        metrics.update(last_eval)
        metrics.update(last_train)
        checkpoint = None
        if rank == 0:  # our own folder first, then the same directory is handed to Ray Train
            path = commit_checkpoint(own_root, spec.keep_checkpoints, model=base, ema=ema, optimizer=opt,
                                     scheduler=sched, scaler=scaler, step=step, epoch=epoch, **gan_parts,
                                     data_position={"epoch": epoch, "batches_in_epoch": batches_in_epoch},
                                     spec=spec.to_dict(), extra={"data_info": info.to_dict()})
            checkpoint = Checkpoint.from_directory(path)
        ray.train.report(metrics, checkpoint=checkpoint)

    while step < spec.steps:
        micro_batches = []
        for _ in range(spec.grad_accum_steps):
            t_wait = time.perf_counter()
            e, batch = next(data)
            window["wait"] += time.perf_counter() - t_wait
            if e != epoch:
                epoch, batches_in_epoch = e, 0
            batches_in_epoch += 1
            micro_batches.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        lr_used = opt.param_groups[0]["lr"]
        pairs: Optional[List[Tuple[Any, torch.Tensor]]] = [] if disc is not None else None
        with frozen(disc):  # the generator's adversarial term reaches D: no gradients there
            loss_value, grad_norm = optimizer_step(model, base, task, micro_batches, opt, scaler, amp,
                                                   spec.optim.grad_clip_norm, step=step, collect=pairs)
        window["loss"] += loss_value
        window["samples"] += sum(len(next(iter(b.values()))) for b in micro_batches)
        sched.step()
        if disc is not None:  # alternating: then the discriminator, on this step's generated clips
            d_stats = discriminator_step(d_model, disc, task, pairs, d_opt, d_scaler, amp, spec.discriminator.optim.grad_clip_norm)
            d_stats["d_lr"] = d_opt.param_groups[0]["lr"]
            d_sched.step()
            for name, v in d_stats.items():
                window[name] = window.get(name, 0.0) + v
        if ema is not None:
            ema.update_parameters(base)
        step += 1
        window["grad_norm"] += grad_norm
        window["steps"] += 1

        if fault is not None and rank == fault[0] and step == fault[1] and not os.path.exists(fault_marker):
            open(fault_marker, "w").write(f"killed rank {rank} at step {step}\n")
            log.error("fault injection: killing rank %d at step %d", rank, step)
            os._exit(1)

        if step % spec.log_every_n_steps == 0 or step == spec.steps:
            dt = time.perf_counter() - window["t0"]
            sps = window["samples"] * world / max(dt, 1e-9)
            m = {
                "train_loss": window["loss"] / max(window["steps"], 1),
                "lr": lr_used,
                "grad_norm": window["grad_norm"] / max(window["steps"], 1),
                "samples_per_s": sps,
                f"{unit_name}_per_s": sps * units,
                "data_wait_share": window["wait"] / max(dt, 1e-9),
                "memory_mb": _memory_mb(device),
            }
            for name in ("d_loss", "d_real", "d_fake", "d_grad_norm", "d_lr"):
                if name in window:
                    m[name] = window[name] / max(window["steps"], 1)
            if peak > 0:
                m["mfu"] = 3.0 * flops * (sps / world) / peak  # fwd + bwd ~ 3x forward FLOPs, per worker
            tracker.log_metrics(m, step)
            last_train.clear()
            last_train.update(m)
            for k, v in m.items():
                history.setdefault(k, []).append((step, v))
            window = new_window()

        if step % spec.eval_every_n_steps == 0 and step < spec.steps:
            run_eval()
        if step % spec.checkpoint_every_n_steps == 0 and step < spec.steps:
            report()
    run_eval(final=True)
    report()

    result: Dict[str, Any] = {"step": step, "resumed_from": resumed_from, "precision": precision,
                              "precision_reason": choice.reason,
                              "val_history": {k: v for k, v in history.items() if k.startswith("val_")}}
    if media_dirs:
        result["samples_dirs"] = media_dirs
    if rank == 0:
        final = ema.module if ema is not None else base
        tracker.log_curve_plot(history, "curves")
        text = task.samples(final, info)
        if text:
            tracker.log_text(text, "samples.txt")
            result["samples"] = text
        logged = track.log_final_model(tracker, final, spec=spec, info=info, task=task,
                                       overrides=model_overrides(spec, task, info), precision=precision)
        if logged:
            result.update(logged)
    return result
