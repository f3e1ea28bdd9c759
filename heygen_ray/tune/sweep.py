"""The sweep launcher: a Ray Tune Tuner over a function trainable that runs one training job per trial.

Train V2: Tune cannot drive a TorchTrainer directly; each trial runs
:func:`run_trial`, which calls the training driver with Tune's ``TuneReportCallback``. Every
``ray.train.report`` of rank 0 (one per evaluation: trials checkpoint at their eval cadence) reaches
Tune as a result carrying ``step``, the validation metrics and ``model_gflops``; ASHA counts time in
optimizer steps. A trial reserves only ``trial_cpus`` (0.01) for itself; its TorchTrainer workers and
its data pipeline reserve their own CPUs, and the number of concurrent trials is capped so that all of
them fit the cluster at once (no trial waits for CPUs another trial's workers hold).

Everything that can be wrong fails in :func:`plan_sweep` / :func:`check_with_data`, before a trial
starts: the base config, every search path, every extreme sample, the metric names, the model at the
sampled sizes and the resources. A trial that fails does not stop the sweep; Tune retries it
(``max_failures``) and the retry resumes from the trial's Train checkpoint (its Train run name is the
trial's own).

MLflow: one parent run for the sweep; each trial is the training job's own run nested under it (one
run per trial, kept across retries); the parent gets the trials table, a plot of the metric against
each swept parameter, the best config and results.json; the best trial's model is registered.

The stage a trial runs is chosen by ``SweepSpec.stage`` through one small :class:`Stage` adapter
(spec class, planning with the default metric/mode, the checks on Ray, the trial function, the
TrainSpecs its CPUs are counted from, the best-config writer): ``train`` is defined here, ``compress``
(one compression job per trial, one teacher shared by all) in :mod:`heygen_ray.tune.compress`.
Everything else (search space, searchers, concurrency, MLflow run tree, summary, Pareto front) is
shared.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import yaml

from heygen_ray import fsutil
from heygen_ray.config import ConfigError, Spec, SweepSpec, TrainSpec, load_yaml, validate_spec
from heygen_ray.tune.space import SearchSpace, merge, non_primitive_choices, plain_values

log = logging.getLogger(__name__)

SWEEP_TAG = "heygen_ray.sweep"
TRIAL_TAG = "heygen_ray.trial_id"
STATUS_TAG = "heygen_ray.trial_status"

# what the training loop reports besides the task's val_* metrics (see train/loop.py)
TRAIN_REPORT_KEYS = ("step", "epoch", "train_loss", "lr", "grad_norm", "samples_per_s", "data_wait_share",
                     "memory_mb", "mfu", "model_gflops", "model_params_m")


@dataclass
class SweepPlan:
    """What a sweep will do, decided (and validated) before any trial starts."""

    spec: SweepSpec
    base: Dict[str, Any]  # base + sweep.train, paths absolute: what trials start from
    portable: Dict[str, Any]  # the same as written in the YAMLs (relative paths kept): for the best config
    space: SearchSpace
    metric: str
    mode: str
    objectives: List[Tuple[str, str]]  # (metric, mode), the primary first
    sweep_dir: str
    max_steps: int
    grace_period: int
    task: str
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def trials_dir(self) -> str:
        return os.path.join(self.sweep_dir, "trials")

    @property
    def stage(self) -> "Stage":
        return stage_for(self.spec.stage)


@dataclass(frozen=True)
class Stage:
    """What the sweep launcher needs from the stage its trials run (``SweepSpec.stage``)."""

    name: str
    spec_cls: Type[Spec]
    plan: Callable[[SweepSpec], SweepPlan]  # validate everything, no Ray; default metric/mode
    check: Callable[[SweepPlan], Tuple[Dict[str, Any], Any]]  # on Ray, before the parent run: (trial kwargs, data info)
    before_trials: Callable[[SweepPlan, Dict[str, Any]], None]  # after the parent run opened: may add to the trial ctx
    trial: Callable[..., None]  # Tune's function trainable: trial(config, ctx, **trial kwargs)
    train_of: Callable[[Spec], TrainSpec]  # the TrainSpec whose workers and data a trial's CPUs are counted from
    planned_steps: Callable[[SweepPlan, Mapping[str, Any]], int]  # the step a trial that completes reports last
    best_config: Callable[[SweepPlan, Mapping[str, Any]], Dict[str, Any]]
    run_command: str  # how the best config is run
    register_best: bool  # register the best trial's logged model


def stage_for(name: str) -> Stage:
    if name == "train":
        return TRAIN_STAGE
    if name == "compress":
        from heygen_ray.tune.compress import COMPRESS_STAGE

        return COMPRESS_STAGE
    raise ConfigError(f"stage: no sweep adapter for {name!r}")  # pragma: no cover - SweepSpec admits no other


# --------------------------------------------------------------------------------------------------
# Planning and validation (no Ray)
# --------------------------------------------------------------------------------------------------


def load_base(spec: SweepSpec, spec_cls: Type[Spec] = TrainSpec) -> Dict[str, Any]:
    """The base stage YAML with the sweep's ``train`` section merged over it (validated)."""
    try:
        raw = load_yaml(spec.base)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    merged = merge(raw, spec.train)
    validate_spec(spec_cls, merged, source=f"{spec.base} + sweep train")
    return merged


def check_searchable(spec: SweepSpec, space: SearchSpace) -> None:
    if spec.search.algorithm == "optuna":
        bad = non_primitive_choices(space)
        if bad:
            raise ConfigError(f"space.{bad[0]}: optuna chooses among plain values only (strings, numbers, "
                              "booleans, null); use search.algorithm random or grid")


def _default_metric(task: str, ema: bool) -> Tuple[str, str]:
    from heygen_ray.train.tasks import get_task

    t = get_task(task)
    return f"val_{'ema_' if ema else ''}{t.primary_metric}", t.primary_mode


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Validate the sweep against its stage's spec (paths, sample types, metric, scheduler): no Ray."""
    return stage_for(spec.stage).plan(spec)


def _plan_train(spec: SweepSpec) -> SweepPlan:
    """Validate the sweep against the training spec: paths, sample types, metric, scheduler."""
    from heygen_ray.train.driver import absolutize

    portable = load_base(spec)
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
    if spec.metric is None:
        metric, mode = _default_metric(task, ema=all(ema_values))
    else:
        metric, mode = spec.metric, spec.mode or "max"
    objectives = [(metric, mode)] + [(o.metric, o.mode) for o in spec.objectives]
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
                     objectives=objectives, sweep_dir=os.path.join(fsutil.absolute(spec.run_dir), spec.name),
                     max_steps=max_steps, grace_period=grace, task=task)


def _candidate_specs(plan: SweepPlan, prefix: str) -> List[Tuple[str, Any]]:
    """(label, stage spec) for the base and each candidate value of the dimensions under ``prefix``."""
    out = [("the base", plan.space.spec_cls.from_dict(plan.base))]
    for d in plan.space.dimensions:
        if d.path.startswith(prefix):
            out += [(f"space.{d.path}: {d.describe(v)}", plan.space.build({d.path: v})) for v in d.candidates()]
    return out


# Paths whose values change what prepare_data builds: trials that sweep them prepare their own data.
DATA_PATHS = ("data", "seed", "task")


def data_swept(plan: SweepPlan) -> List[str]:
    return [p for p in plan.space.paths if p.split(".")[0] in DATA_PATHS]


def check_with_data(plan: SweepPlan):
    """Prepare the base's data once (generating the embedded set and the tokenizer before trials
    could race to), then check the metric names and the model at every sampled size against it.
    Returns (datasets, info) as ``prepare_data`` does: trials that do not sweep the data share them."""
    from heygen_ray.config import ConfigError as _CE
    from heygen_ray.train.driver import check_model, prepare_data
    from heygen_ray.train.loop import task_for

    base = TrainSpec.from_dict(plan.base)
    task = task_for(base)
    datasets, info = prepare_data(base, task)
    unit, _ = task.units_per_sample(info)
    reported = set(TRAIN_REPORT_KEYS) | {f"{unit}_per_s"}
    for k in task.compute_metrics(task.new_metrics(info)):
        reported |= {f"val_{k}", f"val_ema_{k}"}
    for name, _ in plan.objectives:
        if name not in reported:
            import difflib

            close = difflib.get_close_matches(name, sorted(reported), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _CE(f"metric {name!r} is not reported by {plan.task} training{hint}; reported: {', '.join(sorted(reported))}")
    for label, spec in _candidate_specs(plan, "model."):
        try:
            check_model(spec, task_for(spec), info)
        except _CE as err:
            raise _CE(f"{label}: {err}") from None
    return datasets, info


def _data_cpus(spec: TrainSpec) -> float:
    """CPUs a trial's data pipeline holds while its workers train. Video is decoded as it streams
    (the decoder pool shrinks to one actor, never to zero): a trial whose workers hold CPUs while its
    decoder waits for one would wait forever. Text is tokenized and materialised up front (once, by
    the sweep), so training holds no data CPUs."""
    if spec.task in ("video_classification", "text_to_video"):
        return spec.data.video.decoder_num_cpus
    return 0.0


def trial_cpus(plan: SweepPlan) -> float:
    """The most CPUs one trial holds: its driver, its Train workers and its data pipeline (for a
    compress trial: the distillation run's)."""
    need = 0.0
    for _, stage_spec in _candidate_specs(plan, ""):
        spec = plan.stage.train_of(stage_spec)
        workers = max(spec.scaling.num_workers, 0) * spec.scaling.cpus_per_worker
        need = max(need, plan.spec.trial_cpus + workers + _data_cpus(spec))
    return need


def concurrency_for(plan: SweepPlan, cluster_cpus: float) -> int:
    """Concurrent trials that fit ``cluster_cpus`` (at most ``max_concurrent_trials``)."""
    need = trial_cpus(plan)
    trains = [plan.stage.train_of(s) for _, s in _candidate_specs(plan, "")]
    prep = max(s.data.text.num_tokenizers * s.data.text.tokenizer_num_cpus for s in trains)
    if prep > cluster_cpus:
        raise ConfigError(f"the text pipeline needs {prep:g} CPUs (data.text.num_tokenizers x tokenizer_num_cpus) "
                          f"but the cluster has {cluster_cpus:g}")
    fit = int(math.floor(cluster_cpus / need + 1e-9))
    swept = data_swept(plan)
    if swept and fit > 1:
        # Each such trial runs its own Ray Data preparation; two at once on a small cluster can each
        # hold a map actor while waiting for a read task's CPU.
        log.warning("space sweeps %s: each trial prepares its own data, so trials run one at a time",
                    ", ".join(swept))
        fit = 1
    if fit < 1:
        raise ConfigError(
            f"one trial needs {need:g} CPUs (trial_cpus + scaling.num_workers x scaling.cpus_per_worker + its data "
            f"pipeline) but the cluster has {cluster_cpus:g}: lower train.scaling.* or add CPUs"
        )
    if fit < plan.spec.max_concurrent_trials:
        log.warning("max_concurrent_trials=%d lowered to %d: each trial needs %g of the cluster's %g CPUs",
                    plan.spec.max_concurrent_trials, fit, need, cluster_cpus)
    n = min(fit, plan.spec.max_concurrent_trials)
    if plan.spec.stage == "compress" and n > 1:
        log.warning("%d compress trials at a time: their latency measurements share the machine's cores "
                    "(set max_concurrent_trials: 1 for latencies measured alone)", n)
    return n


# --------------------------------------------------------------------------------------------------
# Early stopping that lets a trial shut down cleanly
# --------------------------------------------------------------------------------------------------
#
# When ASHA stops a trial, Tune would kill the trial's actor; its Train controller dies with it and
# the controller's worker placement group is then only released by Ray Train's detached cleaner,
# which finds the cluster through the state API (and fails when several local Ray instances run on
# one machine): the CPUs stay reserved and later trials wait forever. So the sweep's scheduler turns
# ASHA's STOP into a stop request (Ray's internal KV); the trial's Train controller reads it after its
# next report and aborts itself through Ray Train's own abort path, which releases its workers and
# placement group; the trial then returns and Tune records it as finished (early). ASHA's STOP at
# the final report (max_t) is ignored, so completed trials log their model and close their run.

_KV_NAMESPACE = "heygen_ray"


def _stop_key(trial_id: str) -> bytes:
    return f"sweep_stop:{trial_id}".encode()


def request_stop(trial_id: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_stop_key(trial_id), b"1", overwrite=True, namespace=_KV_NAMESPACE)


def stop_requested(trial_id: str) -> bool:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_exists(_stop_key(trial_id), namespace=_KV_NAMESPACE)


def clear_stop(trial_id: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_stop_key(trial_id), namespace=_KV_NAMESPACE)


def _stop_callback(trial_id: str):
    """A Ray Train callback (runs on the trial's controller): abort the run once a stop is requested."""
    import ray
    from ray.train import UserCallback

    class AbortOnStopRequest(UserCallback):
        def __init__(self) -> None:
            self.trial_id = trial_id
            self.aborting = False

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not self.aborting and stop_requested(self.trial_id):
                self.aborting = True
                log.warning("trial %s: early stop requested; aborting its Train run", self.trial_id)
                ray.get_runtime_context().current_actor.abort.remote()

    return AbortOnStopRequest()


def _graceful_asha(plan: SweepPlan, **kwargs):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    base_steps = int(plan.base["steps"])

    class GracefulASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision != TrialScheduler.STOP:
                return decision
            planned = int(plain_values(trial.config.get("params", {})).get("steps", base_steps))
            if int(result.get("step", 0) or 0) < planned:
                request_stop(trial.trial_id)
            return TrialScheduler.CONTINUE

    return GracefulASHA(**kwargs)


# --------------------------------------------------------------------------------------------------
# One trial (runs in the Tune trial actor)
# --------------------------------------------------------------------------------------------------


def trial_spec(ctx: Mapping[str, Any], values: Mapping[str, Any], trial_id: str) -> TrainSpec:
    """The trial's TrainSpec: base + sampled values, its own name and folder, reports at every
    evaluation, tracking nested under the sweep's run. Re-validated here (a sampled float for an
    int field fails loudly)."""
    from heygen_ray.tune.space import set_path

    d = json.loads(json.dumps(ctx["base"]))
    for path, value in plain_values(values).items():
        set_path(d, path, value)
    d["name"] = f"{ctx['name']}_{trial_id}"
    d["run_dir"] = ctx["trials_dir"]
    d["checkpoint_every_n_steps"] = d["eval_every_n_steps"]  # each report to Tune carries fresh metrics + a checkpoint
    tracking = dict(d.get("tracking") or {})
    tracking.update(ctx["tracking"])
    tracking["tags"] = {**(d.get("tracking") or {}).get("tags", {}), **ctx["tracking"].get("tags", {}), TRIAL_TAG: trial_id}
    tracking["registered_model_name"] = None  # only the best trial's model is registered, by the sweep
    d["tracking"] = tracking
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return TrainSpec.from_dict(d, source=f"trial {trial_id} [{shown}]")


def run_trial(config: Dict[str, Any], ctx: Dict[str, Any], prepared=None) -> None:
    """Tune's function trainable: one training job with the trial's values (on the sweep's prepared
    data when the trial does not sweep the data)."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from heygen_ray import tracking as t
    from heygen_ray.train.driver import run_training

    if os.path.isdir(ctx["cwd"]):  # Tune starts trials in their own folder; relative paths are the user's
        os.chdir(ctx["cwd"])
    data_ctx = ray.data.DataContext.get_current()  # Train's workers inherit it: no progress bars per trial
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(ctx, config["params"], trial_id)
    run_id = None
    if spec.tracking.enabled:  # a retried trial continues its run
        runs = t.find_runs(spec.tracking.tracking_uri, spec.tracking.experiment,
                           parent_run_id=spec.tracking.parent_run_id, tags={TRIAL_TAG: trial_id})
        run_id = runs[-1]["run_id"] if runs else None
    try:
        run_training(spec, callbacks=[TuneReportCallback(), _stop_callback(trial_id)], mlflow_run_id=run_id,
                     prepared=prepared)
    except Exception:
        if stop_requested(trial_id):  # stopped early on purpose: the trial ends normally
            log.warning("trial %s stopped early", trial_id)
            return
        raise


# --------------------------------------------------------------------------------------------------
# The sweep (driver)
# --------------------------------------------------------------------------------------------------


def _trial_recorder():
    from ray import tune

    class TrialRecorder(tune.Callback):
        """Keeps every trial's results and how it ended (runs in the driver)."""

        def __init__(self) -> None:
            self.trials: Dict[str, Dict[str, Any]] = {}

        def _row(self, trial) -> Dict[str, Any]:
            return self.trials.setdefault(trial.trial_id, {
                "trial": trial, "params": plain_values(trial.config.get("params", {})), "results": [],
                "ended": None, "retries": 0})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._row(trial)["results"].append({k: v for k, v in result.items() if isinstance(v, (int, float, str))})

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._row(trial)["ended"] = "complete"

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._row(trial)["retries"] += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            self._row(trial)["ended"] = "error"

    return TrialRecorder()


def _searcher(plan: SweepPlan, concurrency: int):
    """Optuna (wrapped in Tune's concurrency limiter through TuneConfig), or Tune's variant
    generator, which enumerates grids and samples the rest and limits concurrency itself
    (TuneConfig.max_concurrent_trials ignores a generator instance)."""
    spec = plan.spec
    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if len(plan.objectives) > 1:
            return OptunaSearch(metric=[m for m, _ in plan.objectives], mode=[d for _, d in plan.objectives],
                                seed=spec.search.seed)
        return OptunaSearch(metric=plan.metric, mode=plan.mode, seed=spec.search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=concurrency)


def _scheduler(plan: SweepPlan):
    if plan.spec.scheduler.kind == "none":
        return None
    s = plan.spec.scheduler
    return _graceful_asha(plan, time_attr="step", metric=plan.metric, mode=plan.mode, max_t=plan.max_steps,
                          grace_period=plan.grace_period, reduction_factor=s.reduction_factor, brackets=s.brackets)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _better_row(a: Mapping[str, Any], b: Mapping[str, Any], objectives: Sequence[Tuple[str, str]]) -> bool:
    """``a`` beats ``b`` on the primary objective, or ties it and wins on the next ones in order (so
    the best trial of a multi-objective sweep is on its Pareto front)."""
    for m, d in objectives:
        x, y = a.get(m), b.get(m)
        if x == y:
            continue
        if not (isinstance(x, (int, float)) and isinstance(y, (int, float))):
            return False
        return _better(x, y, d)
    return False


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Tuple[str, str]]) -> List[str]:
    """Trial ids no other row dominates (at least as good on every objective, better on one)."""
    def dominates(a, b) -> bool:
        ge = all(not _better(b[m], a[m], d) for m, d in objectives)
        gt = any(_better(a[m], b[m], d) for m, d in objectives)
        return ge and gt

    usable = [r for r in rows if all(isinstance(r.get(m), (int, float)) and math.isfinite(r[m]) for m, _ in objectives)]
    return [r["trial_id"] for r in usable if not any(dominates(o, r) for o in usable if o is not r)]


def _trial_rows(plan: SweepPlan, recorder, runs: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for trial_id, rec in recorder.trials.items():
        last = rec["results"][-1] if rec["results"] else {}
        planned = plan.stage.planned_steps(plan, rec["params"])
        step = int(last.get("step", 0) or 0)
        if rec["ended"] == "error":
            status = "error"
        elif step >= planned:
            status = "completed"
        else:
            status = "stopped_early"
        error = None
        if status == "error":
            err = rec["trial"].get_error()
            error = (str(err).strip().splitlines() or [repr(err)])[-1][:500] if err is not None else "failed"
        row = {"trial_id": trial_id, "status": status, **{f"param:{k}": v for k, v in rec["params"].items()},
               "step": step, "planned_steps": planned, "reports": len(rec["results"]), "retries": rec["retries"],
               "mlflow_run_id": (runs.get(trial_id) or {}).get("run_id"), "error": error}
        for m, _ in plan.objectives:
            row[m] = last.get(m)
        rows.append(row)
    return rows


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def best_config(plan: SweepPlan, params: Mapping[str, Any]) -> Dict[str, Any]:
    """The best trial as a ready-to-run training config (as written: relative paths kept)."""
    from heygen_ray.tune.space import set_path

    d = json.loads(json.dumps(plan.portable))
    for path, value in plain_values(params).items():
        set_path(d, path, value)
    d["name"] = f"{plan.spec.name}_best"
    tracking = d.get("tracking") or {}
    tracking.pop("parent_run_id", None)
    if tracking:
        d["tracking"] = tracking
    TrainSpec.from_dict(d, source="best config")  # it must load as it is written
    return d


def _check_train(plan: SweepPlan) -> Tuple[Dict[str, Any], Any]:
    datasets, info = check_with_data(plan)
    return {"prepared": None if data_swept(plan) else (datasets, info)}, info


def _planned_train_steps(plan: SweepPlan, params: Mapping[str, Any]) -> int:
    return int(plan.space.apply(params).get("steps", plan.max_steps))


TRAIN_STAGE = Stage(
    name="train", spec_cls=TrainSpec, plan=_plan_train, check=_check_train, before_trials=lambda plan, ctx: None,
    trial=run_trial, train_of=lambda spec: spec, planned_steps=_planned_train_steps, best_config=best_config,
    run_command="heygen-ray train", register_best=True)


def run_sweep(spec: SweepSpec, *, plan: Optional[SweepPlan] = None) -> Dict[str, Any]:
    """Run the sweep on the current (or a new local) Ray cluster; returns and writes results.json."""
    import ray
    from ray import tune

    from heygen_ray import runtime
    from heygen_ray import tracking as t

    t0 = time.perf_counter()
    plan = plan or plan_sweep(spec)  # fails here, before Ray starts, on a bad config or search space
    stage = plan.stage
    runtime.init_ray(spec.ray)
    trial_kwargs, info = stage.check(plan)
    concurrency = concurrency_for(plan, float(ray.cluster_resources().get("CPU", 0.0)))
    os.makedirs(plan.trials_dir, exist_ok=True)

    trk = t.resolve_spec(spec.tracking, plan.sweep_dir)
    parent = t.make_tracker(trk, plan.sweep_dir, rank=0, run_name=spec.name, tags={SWEEP_TAG: spec.name})
    parent.start()
    parent.log_params(spec.to_dict())
    parent.log_dict(spec.to_dict(), "config/sweep.json")
    parent.log_dict(plan.base, f"config/base_{stage.name}.json")

    ctx = {
        "base": plan.base, "name": spec.name, "trials_dir": plan.trials_dir, "cwd": os.getcwd(),
        "tracking": {"enabled": trk.enabled, "tracking_uri": trk.tracking_uri, "experiment": trk.experiment,
                     "parent_run_id": parent.run_id, "tags": {**trk.tags, SWEEP_TAG: spec.name}},
    }
    enumerate_choices = spec.search.algorithm == "grid"
    recorder = _trial_recorder()
    status = "FAILED"
    try:
        stage.before_trials(plan, ctx)  # compress: the one teacher every trial compresses
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(stage.trial, ctx=ctx, **trial_kwargs), {"CPU": spec.trial_cpus}),
            param_space={"params": plan.space.to_tune(enumerate_choices=enumerate_choices)},
            tune_config=tune.TuneConfig(num_samples=spec.search.num_samples,
                                        max_concurrent_trials=concurrency if spec.search.algorithm == "optuna" else None,
                                        search_alg=_searcher(plan, concurrency), scheduler=_scheduler(plan)),
            run_config=tune.RunConfig(name=spec.name, storage_path=os.path.join(plan.sweep_dir, "tune"),
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      callbacks=[recorder], verbose=0 if runtime.console_is_quiet() else 1),
        )
        tuner.fit()
        for trial_id in recorder.trials:
            clear_stop(trial_id)
        results = _summarise(plan, recorder, parent, trk, info.to_dict(), concurrency, time.perf_counter() - t0)
        status = "FINISHED" if results.get("best") else "FAILED"
    finally:
        parent.end(status)
    if not results.get("best"):
        raise RuntimeError(f"sweep {spec.name}: no trial completed; see {results['trials_csv']}")
    return results


def _summarise(plan: SweepPlan, recorder, parent, trk, info: Dict[str, Any], concurrency: int,
               seconds: float) -> Dict[str, Any]:
    from heygen_ray import tracking as t

    spec = plan.spec
    runs: Dict[str, Dict[str, Any]] = {}
    if trk.enabled:
        for r in t.find_runs(trk.tracking_uri, trk.experiment, parent_run_id=parent.run_id):
            runs[r["tags"].get(TRIAL_TAG, r["run_id"])] = r
    rows = _trial_rows(plan, recorder, runs)

    # trial runs: say how each ended; close the runs of trials Tune stopped (their actor was killed)
    for row in rows:
        run = runs.get(row["trial_id"])
        if run is None:
            continue
        tr = t.make_tracker(trk, plan.sweep_dir, rank=0, run_id=run["run_id"])
        tr.set_tags({STATUS_TAG: row["status"]})
        if row["status"] == "stopped_early":
            tr.end("KILLED")  # the aborted run ended FAILED (or was left RUNNING by a killed actor)
        elif run["status"] == "RUNNING":
            tr.end("FAILED" if row["status"] == "error" else "FINISHED")

    completed = [r for r in rows if r["status"] == "completed" and isinstance(r.get(plan.metric), (int, float))]
    best = None
    for r in completed:
        if best is None or _better_row(r, best, plan.objectives):
            best = r
    front = pareto_front(completed, plan.objectives) if len(plan.objectives) > 1 else None

    os.makedirs(plan.sweep_dir, exist_ok=True)
    trials_csv = os.path.join(plan.sweep_dir, "trials.csv")
    with open(trials_csv, "w") as f:
        f.write(_csv(rows))
    parent.log_artifact(trials_csv, "summary")
    panels = {p: [(r[f"param:{p}"], r[plan.metric], r["status"]) for r in rows
                  if isinstance(r.get(plan.metric), (int, float)) and f"param:{p}" in r]
              for p in plan.space.paths}
    log_x = [d.path for d in plan.space.dimensions if d.kind == "loguniform"]
    plot = parent.log_scatter_plot(panels, plan.metric, "summary/metric_vs_params.png", log_x=log_x)

    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "error")}
    results: Dict[str, Any] = {
        "name": spec.name, "task": plan.task, "metric": plan.metric, "mode": plan.mode,
        "objectives": [{"metric": m, "mode": d} for m, d in plan.objectives],
        "trials": len(rows), **{f"trials_{k}": v for k, v in counts.items()},
        "concurrency": concurrency, "seconds": round(seconds, 1),
        "sweep_dir": plan.sweep_dir, "trials_csv": trials_csv,
        "mlflow_parent_run_id": parent.run_id, "tracking_uri": trk.tracking_uri if trk.enabled else None,
        "summary_plot": plot, "best": None, "best_config_path": None, "model_version": None,
        "registered_model_name": None, "model_uri": None, "pareto_front": front, **plan.extra,
    }
    if best is not None:
        params = {k[len("param:"):]: v for k, v in best.items() if k.startswith("param:")}
        cfg = plan.stage.best_config(plan, params)
        header = (f"# Best trial {best['trial_id']} of sweep {spec.name!r}: {plan.metric} = {best[plan.metric]:.6g} "
                  f"({plan.mode})\n# swept: {json.dumps(params, default=str)}\n"
                  f"# run it: {plan.stage.run_command} --config <this file>\n")
        best_path = os.path.join(plan.sweep_dir, "best_config.yaml")
        with open(best_path, "w") as f:
            f.write(header + yaml.safe_dump(cfg, sort_keys=False))
        parent.log_artifact(best_path, "summary")
        results.update(best={"trial_id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"],
                             "metric": best[plan.metric], "params": params, "step": best["step"],
                             **{m: best.get(m) for m, _ in plan.objectives[1:]}},
                       best_config_path=best_path)
        name = spec.tracking.registered_model_name or ((plan.base.get("tracking") or {}).get("registered_model_name"))
        if plan.stage.register_best and trk.enabled and name and best["mlflow_run_id"]:
            reg = t.register_run_model(trk.tracking_uri, best["mlflow_run_id"], name,
                                       version_tags={SWEEP_TAG: spec.name, TRIAL_TAG: best["trial_id"],
                                                     plan.metric: f"{best[plan.metric]:.6g}"})
            results.update(registered_model_name=name, model_version=reg.version, model_uri=reg.model_uri)
        parent.log_metrics({f"best_{plan.metric}": best[plan.metric]})
        parent.set_tags({"heygen_ray.best_trial_id": best["trial_id"], "heygen_ray.best_run_id": str(best["mlflow_run_id"])})
    parent.log_metrics({"trials": len(rows), **{f"trials_{k}": v for k, v in counts.items()}})
    results["data_info"] = {k: v for k, v in info.items() if k != "mean_clip"}
    results_path = os.path.join(plan.sweep_dir, "results.json")
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    parent.log_artifact(results_path, "summary")
    results["results_path"] = results_path
    results["rows"] = rows
    return results
