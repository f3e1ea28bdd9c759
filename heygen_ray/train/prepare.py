"""What a training starts from, decided before its loop runs: the task and the model.

* the task, with the spec's loss settings (:func:`task_for`; a text_to_video judge, :func:`load_judge`);
* the starting model: ``spec.model`` built and warm-started from ``spec.model.init_from``
  (:func:`apply_init_from`), or a given model instead (``WorkerConfig.init_model``, e.g. a pruned
  student whose shape differs from the preset's);
* distillation: the task wrapped in a `DistillationTask` against a frozen teacher
  (``WorkerConfig.distill``).

The loop receives a :class:`Start` (task, model, learning-rate scales, run params) and knows none of
these options. The driver uses the same builders to check a spec before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from heygen_ray.config import ConfigError, TrainSpec
from heygen_ray.train.tasks import DataInfo, DistillationTask, Judge, Task, get_task
from heygen_ray.train.warm_start import WarmStartReport, warm_start
from heygen_ray.train.worker_config import DistillConfig, WorkerConfig


def model_overrides(spec: TrainSpec, task: Task, info: DataInfo) -> Dict[str, Any]:
    """What the data dictates (classes, vocabulary, clip shape), then the YAML's own overrides."""
    return {**task.model_overrides(info), **spec.model.overrides}


def build_model(spec: TrainSpec, task: Task, info: DataInfo) -> nn.Module:
    from heygen_ray.models import create_model

    return create_model(spec.model.name, **model_overrides(spec, task, info))


def apply_init_from(model: nn.Module, spec: TrainSpec, tracking_uri: Optional[str]) -> Optional[WarmStartReport]:
    """Warm-start ``model`` from ``spec.model.init_from`` (None when unset); fails, naming the field,
    when not one tensor of the source fits."""
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


def load_judge(spec: TrainSpec, info: DataInfo, tracking_uri: Optional[str], device: Optional[torch.device] = None) -> Judge:
    """The text_to_video judge of ``spec.judge`` (a registered video classifier) as a tasks.Judge."""
    from heygen_ray.config import COLORS
    from heygen_ray.tracking import load_model_and_config, recorded_data_info

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


def starting_model(cfg: WorkerConfig, task: Task, device: torch.device) -> Tuple[nn.Module, Optional[WarmStartReport]]:
    """The model training starts from, on ``device``: ``cfg.init_model`` when given (in training
    mode, whatever its shape), else ``spec.model`` built and warm-started from ``init_from`` (with the
    warm start's report)."""
    if cfg.init_model:
        from heygen_ray.tracking import load_model

        return load_model(cfg.init_model).train().to(device), None
    model = build_model(cfg.spec, task, cfg.data_info)
    warm = apply_init_from(model, cfg.spec, cfg.tracking_uri)
    return model.to(device), warm


def with_teacher(task: Task, distill: Optional[DistillConfig], device: torch.device) -> Task:
    """``task`` distilled from ``distill.teacher`` (frozen, on ``device``; outside DDP and never
    checkpointed with the student), or ``task`` itself without distillation."""
    if distill is None:
        return task
    from heygen_ray.tracking import load_model

    teacher = load_model(distill.teacher).to(device)
    return DistillationTask(task, teacher, distill.temperature, distill.alpha, distill.hidden_weight)


@dataclass
class Start:
    """What a worker's training starts from."""

    task: Task
    model: nn.Module  # on the worker's device, not yet wrapped for DDP
    lr_scales: Optional[Dict[str, float]] = None  # parameter name -> learning-rate multiplier (warm-started ones)
    run_params: Dict[str, Any] = field(default_factory=dict)  # logged once, by a fresh run (not by a resume)


def prepare(cfg: WorkerConfig, rank: int, device: torch.device) -> Start:
    """The task and starting model of one worker (every rank builds the same, from the same seed)."""
    spec, info = cfg.spec, cfg.data_info
    # only rank 0 evaluates, so only rank 0 loads a judge
    judge = load_judge(spec, info, cfg.tracking_uri, device) if spec.judge is not None and rank == 0 else None
    task = task_for(spec, judge)
    torch.manual_seed(spec.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
    model, warm = starting_model(cfg, task, device)
    start = Start(with_teacher(task, cfg.distill, device), model)
    if warm is not None:
        init = spec.model.init_from
        start.run_params = {"init_from": init.uri, **warm.summary()}
        if init.lr_scale != 1.0:
            start.lr_scales = {name: init.lr_scale for name in warm.copied}
    return start
