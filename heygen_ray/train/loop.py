"""The per-worker training loop (runs inside Ray Train's TorchTrainer workers).

DDP (gloo on CPU, nccl on GPU) through ``ray.train.torch.prepare_model``; data from
``get_dataset_shard``; AMP (bf16 autocast, or fp16 + GradScaler on CUDA); gradient accumulation with
``no_sync`` on micro-steps; clipping; AdamW with decay / no-decay groups; warmup + schedule stepped per
optimizer step; EMA; checkpoints every N steps in the one checkpoint format; resume from the latest
checkpoint after a worker failure or when a job with the same name is re-run; optional fault injection.
Rank 0 logs to MLflow; other ranks get a null tracker.

One worker's training is a :class:`TrainState` and a sequence of functions on it::

    setup -> resume -> start -> (train_step [log_train] [validate] [report]) until spec.steps
          -> validate(final) -> report -> finish

What it starts from (the task, the model, a warm start, a distillation teacher) is decided before,
by heygen_ray.train.prepare; a GAN's discriminator is the optional heygen_ray.train.gan.Adversary.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from heygen_ray.config import TrainSpec
from heygen_ray.train.checkpoint import CheckpointParts, commit_checkpoint, latest_checkpoint, load_checkpoint, read_meta
from heygen_ray.train.ema import make_ema
from heygen_ray.train.gan import METRICS as ADVERSARY_METRICS
from heygen_ray.train.gan import Adversary, frozen
from heygen_ray.train.optim import adamw, schedule_at
from heygen_ray.train.precision import PrecisionChoice, autocast, choose_precision
from heygen_ray.train.prefetch import Prefetch
from heygen_ray.train.prepare import model_overrides, prepare
from heygen_ray.train.step import evaluate, optimizer_step
from heygen_ray.train.tasks import DataInfo, Task
from heygen_ray.train.worker_config import WorkerConfig

log = logging.getLogger(__name__)

FAULT_ENV = "HEYGEN_FAULT"  # "rank:step": kill that rank at that optimizer step (first attempt only)


def fault_plan(spec: TrainSpec) -> Optional[Tuple[int, int]]:
    if spec.fault is not None:
        return spec.fault.rank, spec.fault.step
    env = os.environ.get(FAULT_ENV)
    if env:
        rank, step = env.split(":")
        return int(rank), int(step)
    return None


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def batches(shard, spec: TrainSpec, task: Task, epoch_start: int,
            hold_mb: float = 0.0) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
    """Endless (epoch, micro-batch) pairs, epoch after epoch; only full micro-batches.

    An epoch re-executes the Ray dataset (its shard of it), shuffled locally. ``hold_mb`` > 0 (the
    split is materialised, so its rows are the same every epoch): the rows of the first epoch are kept
    while they take at most ``hold_mb`` MB, and every later epoch is a permutation of them seeded by
    ``spec.seed + epoch``. A small cached split then costs one Ray Data execution per run instead of one
    per epoch (on 2 cores each costs about a second, longer than an epoch of a micro model), and the
    data order of those epochs is a function of (seed, epoch)."""
    epoch, held = epoch_start, None
    while True:
        n = 0
        if held is None:
            kept, size, keep = [], 0, hold_mb > 0
            for batch in shard.iter_torch_batches(batch_size=spec.batch_size, dtypes=dict(task.dtypes), drop_last=False,
                                                   local_shuffle_buffer_size=max(spec.batch_size * 4, 64),
                                                   local_shuffle_seed=spec.seed + epoch):
                if keep:
                    keep = all(isinstance(v, torch.Tensor) for v in batch.values())
                    size += sum(v.element_size() * v.nelement() for v in batch.values()) if keep else 0
                    keep = keep and size <= hold_mb * 2**20
                    if keep:
                        kept.append(batch)
                    else:  # too large to hold (or not all tensors): this run streams every epoch
                        kept.clear()
                if len(next(iter(batch.values()))) == spec.batch_size:
                    n += 1
                    yield epoch, batch
            if keep and kept:
                held = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}
        else:
            rows = len(next(iter(held.values())))
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(spec.seed + epoch))
            for i in range(0, rows - spec.batch_size + 1, spec.batch_size):
                n += 1
                yield epoch, {k: v[order[i:i + spec.batch_size]] for k, v in held.items()}
        if n == 0:
            raise RuntimeError(f"the training shard yielded no full batch of {spec.batch_size}: lower batch_size")
        epoch += 1


@dataclass
class Meter:
    """Sums over the optimizer steps since the last log line."""

    t0: float = field(default_factory=time.perf_counter)
    loss: float = 0.0
    samples: int = 0
    wait: float = 0.0  # seconds spent waiting for data
    grad_norm: float = 0.0
    steps: int = 0
    lr: float = 0.0  # the learning rate of the latest step (logged as it is)
    adversary: Dict[str, float] = field(default_factory=dict)  # the discriminator's METRICS

    def add(self, loss: float, samples: int, grad_norm: float, lr: float, adversary: Mapping[str, float]) -> None:
        self.loss += loss
        self.samples += samples
        self.grad_norm += grad_norm
        self.steps += 1
        self.lr = lr
        for name, v in adversary.items():
            self.adversary[name] = self.adversary.get(name, 0.0) + v


@dataclass
class Throughput:
    """What turns a step rate into the logged throughput and MFU."""

    flops: float  # forward FLOPs of one sample
    n_params: int
    unit_name: str  # frames or tokens (task.units_per_sample)
    units: int  # per sample
    peak: float  # FLOP/s of one worker (0: unknown, no MFU)


@dataclass
class TrainState:
    """Everything one worker's training holds: built by :func:`setup`, positioned by :func:`resume`,
    connected to DDP, the tracker and the data by :func:`start`."""

    cfg: WorkerConfig
    task: Task
    rank: int
    world: int
    device: torch.device
    base: nn.Module  # the model itself: checkpointed, evaluated and logged
    ema: Optional[nn.Module]  # an AveragedModel of `base` (spec.ema)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # rebuilt from the step on resume (optim.schedule_at)
    scaler: torch.amp.GradScaler  # enabled in fp16 only
    choice: PrecisionChoice
    amp: Callable[[], ContextManager[Any]]  # the autocast context of the chosen precision
    adversary: Optional[Adversary] = None  # a GAN task's discriminator
    run_params: Dict[str, Any] = field(default_factory=dict)  # logged once by a fresh run (the warm start's)
    # the position: the step, and where in the data it is (saved in every checkpoint)
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    resumed_from: Optional[int] = None
    # set by start()
    model: Optional[nn.Module] = None  # what trains: `base` wrapped for DDP (and compiled)
    tracker: Any = None
    data: Optional[Prefetch[Tuple[int, Dict[str, torch.Tensor]]]] = None  # (epoch, micro-batch), read ahead
    val_shard: Any = None  # None: no validation (or not rank 0's to run)
    throughput: Optional[Throughput] = None
    fault: Optional[Tuple[int, int]] = None  # (rank, step) to kill, see fault_plan
    # what was logged, for the reports and the result
    meter: Meter = field(default_factory=Meter)
    wait_total: float = 0.0  # seconds waited for data since start(), over all log windows
    started_at: float = 0.0  # when start() handed over to the first step (perf_counter)
    history: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    last_train: Dict[str, float] = field(default_factory=dict)
    last_eval: Dict[str, float] = field(default_factory=dict)
    media_batch: Dict[str, torch.Tensor] = field(default_factory=dict)  # the first validation batch
    media_dirs: List[str] = field(default_factory=list)

    @property
    def spec(self) -> TrainSpec:
        return self.cfg.spec

    @property
    def info(self) -> DataInfo:
        return self.cfg.data_info

    @property
    def final_model(self) -> nn.Module:
        """What the training delivers: the EMA model when EMA is on, else the model."""
        return self.ema.module if self.ema is not None else self.base

    def checkpoint_parts(self) -> CheckpointParts:
        parts = CheckpointParts(model=self.base, ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler,
                                scaler=self.scaler)
        if self.adversary is not None:
            self.adversary.add_checkpoint_parts(parts)
        return parts

    def record(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((self.step, v))


def setup(cfg: WorkerConfig) -> TrainState:
    """This worker's task, model, EMA, optimizer, schedule, precision and (GAN) discriminator, at step 0."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    spec = cfg.spec
    start = prepare(cfg, rank, device)
    model, task = start.model, start.task
    if spec.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = make_ema(model, spec.ema.decay, spec.ema.warmup) if spec.ema.enabled else None
    task.attach_student(model)  # after the EMA copy, which would copy any hook on the model
    opt = adamw(model, spec.optim, start.lr_scales)
    sched = schedule_at(opt, spec, 0)
    choice = choose_precision(spec, model, task, cfg.data_info, device, world, cfg.precision_record)
    fp16 = choice.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    return TrainState(cfg=cfg, task=task, rank=rank, world=world, device=device, base=model, ema=ema, optimizer=opt,
                      scheduler=sched, scaler=scaler, choice=choice, amp=autocast(device.type, choice.precision),
                      adversary=Adversary.build(task, spec, device, fp16), run_params=start.run_params)


def resume(state: TrainState) -> None:
    """Continue from the newest checkpoint Ray Train knows of, or the newest complete one in the run's
    own folder: Ray registers a reported checkpoint when its controller next polls the workers, so a
    worker that dies right after reporting can leave Ray one checkpoint behind. A fresh run stays at
    step 0."""
    import ray.train

    own = latest_checkpoint(state.cfg.checkpoints_root)
    own_step = read_meta(own).step if own is not None else -1
    parts = state.checkpoint_parts().to_restore()
    meta, source = None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:  # opened once: on remote storage this is a download
            if read_meta(d).step >= own_step:
                meta, source = load_checkpoint(d, **parts), "ray"
    if meta is None and own is not None:
        meta, source = load_checkpoint(own, **parts), "own"
    if meta is None:
        return
    state.step = state.resumed_from = meta.step
    state.epoch = int(meta.data_position.get("epoch", 0))
    log.warning("[rank %d] resumed from step %d (epoch %d, %s checkpoint)", state.rank, state.step, state.epoch, source)
    state.scheduler = schedule_at(state.optimizer, state.spec, state.step)
    if state.adversary is not None:
        state.adversary.schedule_at(state.step)


def start(state: TrainState) -> None:
    """Wrap the model(s) for DDP (and compile), attach the tracker (a fresh run logs its params), the
    data and the throughput figures."""
    import ray.train
    import ray.train.torch

    from heygen_ray.models import unwrap_model
    from heygen_ray.train import track

    spec, cfg, task, info = state.spec, state.cfg, state.task, state.info
    # the data first: its start-up (split coordinator, first blocks) runs beside DDP and the tracker
    shard = ray.train.get_dataset_shard("train")
    state.val_shard = ray.train.get_dataset_shard("val") if cfg.has_val else None
    state.data = Prefetch(batches(shard, spec, task, state.epoch, spec.hold_train_shard_mb if cfg.train_materialized else 0.0),
                          depth=max(2, spec.grad_accum_steps), name=f"batches-rank{state.rank}")
    state.model = ray.train.torch.prepare_model(state.base)
    if state.adversary is not None:
        state.adversary.distribute(ray.train.torch.prepare_model)
    if spec.compile:
        state.model = torch.compile(state.model)
    state.tracker = track.attach(spec.tracking.to_dict(), cfg.run_dir, rank=state.rank, run_id=cfg.mlflow_run_id,
                                 resilient=True)
    if state.resumed_from is None:  # a resumed run logged its choice already (a retry logs the same values again)
        state.tracker.log_params(state.choice.to_params())
        if state.run_params:
            state.tracker.log_params(state.run_params)
    unit_name, units = task.units_per_sample(info)
    state.throughput = Throughput(
        flops=unwrap_model(state.base).flops_per_sample(task.inputs(task.example_batch(info, 1))[0]),
        n_params=sum(p.numel() for p in state.base.parameters()), unit_name=unit_name, units=units,
        peak=cfg.peak_for(state.choice.precision))
    state.fault = fault_plan(spec)
    state.meter = Meter()
    state.started_at = state.meter.t0
    state.model.train()


def _next_micro_batches(state: TrainState) -> List[Dict[str, torch.Tensor]]:
    """The next grad_accum_steps micro-batches on the device; keeps the data position."""
    out = []
    for _ in range(state.spec.grad_accum_steps):
        t_wait = time.perf_counter()
        epoch, batch = next(state.data)
        waited = time.perf_counter() - t_wait
        state.meter.wait += waited
        state.wait_total += waited
        if epoch != state.epoch:
            state.epoch, state.batches_in_epoch = epoch, 0
        state.batches_in_epoch += 1
        out.append({k: v.to(state.device, non_blocking=True) for k, v in batch.items()})
    return out


def train_step(state: TrainState) -> None:
    """One optimizer step of the model over grad_accum_steps micro-batches, then (GAN) one of the
    discriminator on the clips this step generated; the EMA update; the step's sums for the log."""
    micro_batches = _next_micro_batches(state)
    lr = state.optimizer.param_groups[0]["lr"]
    adversary = state.adversary
    pairs: Optional[List[Tuple[Any, torch.Tensor]]] = [] if adversary is not None else None
    with frozen(adversary.model if adversary is not None else None):  # the generator's adversarial term reaches D: no gradients there
        loss, grad_norm = optimizer_step(state.model, state.base, state.task, micro_batches, state.optimizer,
                                         state.scaler, state.amp, state.spec.optim.grad_clip_norm, step=state.step,
                                         collect=pairs)
    state.scheduler.step()
    d_stats = adversary.step(state.task, pairs, state.amp) if adversary is not None else {}
    if state.ema is not None:
        state.ema.update_parameters(state.base)
    state.step += 1
    samples = sum(len(next(iter(b.values()))) for b in micro_batches)
    state.meter.add(loss, samples, grad_norm, lr, d_stats)


def inject_fault(state: TrainState) -> None:
    """Fault injection (spec.fault or HEYGEN_FAULT): kill this worker at the planned step, once per run."""
    if state.fault is None or state.rank != state.fault[0] or state.step != state.fault[1]:
        return
    marker = state.cfg.fault_marker
    if os.path.exists(marker):  # a later attempt of the run: it trains through
        return
    open(marker, "w").write(f"killed rank {state.rank} at step {state.step}\n")
    log.error("fault injection: killing rank %d at step %d", state.rank, state.step)
    os._exit(1)


def log_train(state: TrainState) -> None:
    """The training metrics of the steps since the last log line: logged (rank 0), kept for the reports."""
    meter, tp, world = state.meter, state.throughput, state.world
    dt = time.perf_counter() - meter.t0
    n = max(meter.steps, 1)
    sps = meter.samples * world / max(dt, 1e-9)
    m = {
        "train_loss": meter.loss / n,
        "lr": meter.lr,
        "grad_norm": meter.grad_norm / n,
        "samples_per_s": sps,
        f"{tp.unit_name}_per_s": sps * tp.units,
        "data_wait_share": meter.wait / max(dt, 1e-9),
        "memory_mb": _memory_mb(state.device),
    }
    for name in ADVERSARY_METRICS:
        if name in meter.adversary:
            m[name] = meter.adversary[name] / n
    if tp.peak > 0:
        m["mfu"] = 3.0 * tp.flops * (sps / world) / tp.peak  # fwd + bwd ~ 3x forward FLOPs, per worker
    state.tracker.log_metrics(m, state.step)
    state.last_train = m
    state.record(m)
    state.meter = Meter()


def validate(state: TrainState, final: bool = False) -> None:
    """Rank 0 only (no collective): exact metrics on the unsplit validation set, raw and EMA; the
    confusion matrix at the end; the media samples."""
    if state.val_shard is None or state.rank != 0:
        return
    spec, task = state.spec, state.task
    models = {"val": state.base} if state.ema is None else {"val": state.base, "val_ema": state.ema.module}
    res = evaluate(models, state.val_shard.iter_torch_batches(batch_size=spec.batch_size, dtypes=dict(task.dtypes)),
                   task, state.info, state.device, state.amp, first=state.media_batch)
    state.last_eval = {f"{prefix}_{k}": v for prefix, (metrics, _) in res.items() for k, v in metrics.items()}
    scored = res["val_ema" if state.ema is not None else "val"][1]
    state.tracker.log_metrics(state.last_eval, state.step)
    state.record(state.last_eval)
    if final and "confusion" in scored:
        state.tracker.log_confusion_matrix(scored["confusion"].tolist(), state.info.label_names, "confusion_matrix")
    log_media(state)


def log_media(state: TrainState) -> None:
    """Rank 0: what the final model makes of a fixed set of validation examples, as files in
    <run_dir>/samples/step_XXXXXXXX/ and the MLflow artifacts samples/step_XXXXXXXX/."""
    task = state.task
    if type(task).media is Task.media or not state.media_batch:
        return
    n = getattr(task, "MEDIA_SAMPLES", 4)  # the first validation rows, the same at every evaluation
    fixed = {k: v[:n] for k, v in state.media_batch.items()}
    files = task.media(state.final_model, fixed, state.info)
    if not files:
        return
    folder = os.path.join(state.cfg.run_dir, "samples", f"step_{state.step:08d}")
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    state.tracker.log_artifact(folder, f"samples/step_{state.step:08d}")
    state.media_dirs.append(folder)


def report(state: TrainState) -> None:
    """Every rank (a barrier): the latest metrics to Ray Train, with rank 0's checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    spec, tp = state.spec, state.throughput
    metrics: Dict[str, Any] = {"step": state.step, "epoch": state.epoch, "model_gflops": tp.flops / 1e9,
                               "model_params_m": tp.n_params / 1e6, **state.last_eval, **state.last_train,
                               # the share of the whole run so far (data_wait_share: of the last log window)
                               "data_wait_share_total": state.wait_total / max(time.perf_counter() - state.started_at, 1e-9)}
    checkpoint = None
    if state.rank == 0:  # our own folder first, then the same directory is handed to Ray Train
        path = commit_checkpoint(state.cfg.checkpoints_root, spec.keep_checkpoints, step=state.step, epoch=state.epoch,
                                 data_position={"epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch},
                                 spec=spec.to_dict(), extra={"data_info": state.info.to_dict()},
                                 **state.checkpoint_parts().to_save())
        checkpoint = Checkpoint.from_directory(path)
    ray.train.report(metrics, checkpoint=checkpoint)


def finish(state: TrainState) -> Dict[str, Any]:
    """The worker's result; rank 0 logs the curves, the text samples and the final model."""
    from heygen_ray.train import track

    result: Dict[str, Any] = {"step": state.step, "resumed_from": state.resumed_from, "precision": state.choice.precision,
                              "precision_reason": state.choice.reason,
                              "val_history": {k: v for k, v in state.history.items() if k.startswith("val_")}}
    if state.media_dirs:
        result["samples_dirs"] = state.media_dirs
    if state.rank != 0:
        return result
    spec, task, info, final = state.spec, state.task, state.info, state.final_model
    state.tracker.log_curve_plot(state.history, "curves")
    text = task.samples(final, info)
    if text:
        state.tracker.log_text(text, "samples.txt")
        result["samples"] = text
    logged = track.log_final_model(state.tracker, final, spec=spec, info=info, task=task,
                                   overrides=model_overrides(spec, task, info), precision=state.choice.precision)
    if logged:
        result.update(logged)
    missing = state.tracker.close() if hasattr(state.tracker, "close") else {}
    if missing:  # the training finished and its checkpoints landed; this part of its MLflow run did not
        result["tracking_not_logged"] = missing
    return result


def train_loop_per_worker(config: Union[WorkerConfig, Mapping[str, Any]]) -> Dict[str, Any]:
    """One worker's training. ``config``: a WorkerConfig or its to_dict() (what the driver hands Ray Train)."""
    state = setup(WorkerConfig.coerce(config))
    resume(state)
    try:
        start(state)
        spec = state.spec
        while state.step < spec.steps:
            train_step(state)
            inject_fault(state)
            if state.step % spec.log_every_n_steps == 0 or state.step == spec.steps:
                log_train(state)
            if state.step % spec.eval_every_n_steps == 0 and state.step < spec.steps:
                validate(state)
            if state.step % spec.checkpoint_every_n_steps == 0 and state.step < spec.steps:
                report(state)
        validate(state, final=True)
        report(state)
        return finish(state)
    finally:
        if state.data is not None:  # the read-ahead thread stops with the loop, however it ends
            state.data.close()
