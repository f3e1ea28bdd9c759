"""Sweeps of the training stage (``SweepSpec.stage: train``): one training job per trial.

The base is a training YAML (TrainSpec) and the space's paths are TrainSpec paths. Train V2: Tune
cannot drive a TorchTrainer directly; each trial runs :func:`run_trial`, which calls the training
driver with Tune's ``TuneReportCallback``. Every ``ray.train.report`` of rank 0 (one per evaluation:
trials checkpoint at their eval cadence) reaches Tune as a result carrying ``step``, the validation
metrics and ``model_gflops``; ASHA counts time in optimizer steps and stops a trial through a stop
request its Train controller honours (:func:`heygen_ray.tune.stage.stop_callback`).

A trial that fails does not stop the sweep; Tune retries it (``max_failures``) and the retry resumes
from the trial's Train checkpoint (its Train run name is the trial's own) and continues the trial's
MLflow run. The best trial's logged model is registered by the sweep.

The TrainSpec of a trial is built from dicts (the base dict with the sampled values set, validated
by ``TrainSpec.from_dict``); the training driver builds its workers' config from that spec.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Callable, Dict, Mapping, Tuple

from heygen_ray.config import ConfigError, Spec, SweepSpec, TrainSpec, validate_spec
from heygen_ray.tune.space import SearchSpace
from heygen_ray.tune.stage import (
    TRIAL_TAG,
    Stage,
    SweepPlan,
    candidate_specs,
    check_searchable,
    data_swept,
    drop_sweep_tracking,
    enter_trial,
    load_base,
    nest_trial_tracking,
    objectives_of,
    stop_callback,
    stop_requested,
    sweep_dir_of,
    with_values,
)

log = logging.getLogger(__name__)

# what the training loop reports besides the task's val_* metrics (see train/loop.py)
TRAIN_REPORT_KEYS = ("step", "epoch", "train_loss", "lr", "grad_norm", "samples_per_s", "data_wait_share",
                     "memory_mb", "mfu", "model_gflops", "model_params_m")


def _default_metric(task: str, ema: bool) -> Tuple[str, str]:
    from heygen_ray.train.tasks import get_task

    t = get_task(task)
    return f"val_{'ema_' if ema else ''}{t.primary_metric}", t.primary_mode


def plan_train(spec: SweepSpec) -> SweepPlan:
    """Validate the sweep against the training spec: paths, sample types, metric, scheduler."""
    from heygen_ray.train.driver import absolutize

    portable = load_base(spec, TrainSpec)
    base_spec = absolutize(validate_spec(TrainSpec, portable, source=f"{spec.base} + sweep train"))
    base = base_spec.to_dict()
    space = SearchSpace(TrainSpec, base, spec.space)
    space.validate()
    check_searchable(spec, space)

    ema_values = {base_spec.ema.enabled}
    if "ema.enabled" in space.paths:
        ema_values |= {bool(v) for v in space.dimension("ema.enabled").candidates()}
    task = base_spec.task
    if "task" in space.paths:
        raise ConfigError("space.task: a sweep compares configurations of one task; sweep task-specific fields instead")
    objectives = objectives_of(spec, lambda: _default_metric(task, ema=all(ema_values)))
    metric, mode = objectives[0]
    for name, _ in objectives:
        if name.startswith("val_ema_") and False in ema_values:
            where = "the base (ema.enabled: false)" if not base_spec.ema.enabled else "space.ema.enabled"
            raise ConfigError(f"metric {name!r} needs EMA, which {where} turns off; use {name.replace('val_ema_', 'val_')!r}")

    steps = [base_spec.steps]
    if "steps" in space.paths:
        steps += [int(v) for v in space.dimension("steps").candidates()]
    max_steps = max(steps)
    grace = spec.scheduler.grace_period or base_spec.eval_every_n_steps
    if spec.scheduler.kind == "asha" and grace > max_steps:
        raise ConfigError(f"scheduler.grace_period={grace} is beyond the trials' {max_steps} steps")
    return SweepPlan(spec=spec, base=base, portable=portable, space=space, metric=metric, mode=mode,
                     objectives=objectives, sweep_dir=sweep_dir_of(spec), max_steps=max_steps, grace_period=grace,
                     task=task, stage=TRAIN_STAGE)


def check_with_data(plan: SweepPlan):
    """Prepare the base's data once (generating the embedded set and the tokenizer before trials
    could race to), then check the metric names and the model at every sampled size against it.
    Returns (datasets, info) as ``prepare_data`` does: trials that do not sweep the data share them."""
    from heygen_ray.train.driver import check_model, prepare_data
    from heygen_ray.train.prepare import task_for

    base = TrainSpec.from_dict(plan.base)
    task = task_for(base)
    datasets, info = prepare_data(base, task)
    unit, _ = task.units_per_sample(info)
    reported = set(TRAIN_REPORT_KEYS) | {f"{unit}_per_s"}
    for k in task.compute_metrics(task.new_metrics(info)):
        reported |= {f"val_{k}", f"val_ema_{k}"}
    for name, _ in plan.objectives:
        if name not in reported:
            close = difflib.get_close_matches(name, sorted(reported), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"metric {name!r} is not reported by {plan.task} training{hint}; reported: {', '.join(sorted(reported))}")
    for label, spec in candidate_specs(plan, "model."):
        try:
            check_model(spec, task_for(spec), info)
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}") from None
    return datasets, info


# --------------------------------------------------------------------------------------------------
# One trial (runs in the Tune trial actor)
# --------------------------------------------------------------------------------------------------


def trial_spec(ctx: Mapping[str, Any], values: Mapping[str, Any], trial_id: str) -> TrainSpec:
    """The trial's TrainSpec: base + sampled values, its own name and folder, reports at every
    evaluation, tracking nested under the sweep's run. Re-validated here (a sampled float for an
    int field fails loudly)."""
    d = with_values(ctx["base"], values)
    d["name"] = f"{ctx['name']}_{trial_id}"
    d["run_dir"] = ctx["trials_dir"]
    d["checkpoint_every_n_steps"] = d["eval_every_n_steps"]  # each report to Tune carries fresh metrics + a checkpoint
    nest_trial_tracking(d, ctx, trial_id)
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return TrainSpec.from_dict(d, source=f"trial {trial_id} [{shown}]")


def run_trial(config: Dict[str, Any], ctx: Dict[str, Any], prepared=None) -> None:
    """Tune's function trainable: one training job with the trial's values (on the sweep's prepared
    data when the trial does not sweep the data)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from heygen_ray import tracking as t
    from heygen_ray.train.driver import run_training

    trial_id = enter_trial(ctx)
    spec = trial_spec(ctx, config["params"], trial_id)
    run_id = None
    if spec.tracking.enabled:  # a retried trial continues its run
        runs = t.find_runs(spec.tracking.tracking_uri, spec.tracking.experiment,
                           parent_run_id=spec.tracking.parent_run_id, tags={TRIAL_TAG: trial_id})
        run_id = runs[-1]["run_id"] if runs else None
    try:
        run_training(spec, callbacks=[TuneReportCallback(), stop_callback(trial_id)], mlflow_run_id=run_id,
                     prepared=prepared)
    except Exception:
        if stop_requested(trial_id):  # stopped early on purpose: the trial ends normally
            log.warning("trial %s stopped early", trial_id)
            return
        raise


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------


def best_train_config(plan: SweepPlan, params: Mapping[str, Any]) -> Dict[str, Any]:
    """The best trial as a ready-to-run training config (as written: relative paths kept)."""
    d = with_values(plan.portable, params)
    d["name"] = f"{plan.spec.name}_best"
    drop_sweep_tracking(d)
    TrainSpec.from_dict(d, source="best config")  # it must load as it is written
    return d


class TrainStage(Stage):
    name = "train"
    spec_cls = TrainSpec
    run_command = "heygen-ray train"
    register_best = True

    def plan(self, spec: SweepSpec) -> SweepPlan:
        return plan_train(spec)

    def check(self, plan: SweepPlan) -> Tuple[Dict[str, Any], Any]:
        """Prepare the data once and check metrics and model sizes against it; trials that do not
        sweep the data train on these prepared datasets."""
        datasets, info = check_with_data(plan)
        return {"prepared": None if data_swept(plan) else (datasets, info)}, info

    def trainable(self) -> Callable[..., None]:
        return run_trial

    def train_of(self, spec: Spec) -> TrainSpec:
        return spec

    def planned_steps(self, plan: SweepPlan, params: Mapping[str, Any]) -> int:
        return int(plan.space.apply(params).get("steps", plan.max_steps))

    def best_config(self, plan: SweepPlan, params: Mapping[str, Any]) -> Dict[str, Any]:
        return best_train_config(plan, params)


TRAIN_STAGE = TrainStage()
