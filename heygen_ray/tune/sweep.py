"""The sweep launcher: a Ray Tune Tuner over a function trainable, one stage job per trial.

The stage a trial runs is chosen by ``SweepSpec.stage`` among the adapters of
:class:`~heygen_ray.tune.stage.Stage`: ``train`` (:mod:`heygen_ray.tune.train`, one training job per
trial) and ``compress`` (:mod:`heygen_ray.tune.compress`, one compression job per trial, one teacher
shared by all). Everything else is here and shared: searchers, the scheduler, concurrency, the MLflow
run tree, the summary, the Pareto front and the :class:`~heygen_ray.tune.result.SweepResult`.

A trial reserves only ``trial_cpus`` (0.01) for itself; its TorchTrainer workers and its data pipeline
reserve their own CPUs, and the number of concurrent trials is capped so that all of them fit the
cluster at once (no trial waits for CPUs another trial's workers hold).

Everything that can be wrong fails in :func:`plan_sweep` (no Ray) or in the stage's check on Ray,
before a trial starts: the base config, every search path, every extreme sample, the metric names, the
model at the sampled sizes and the resources. A trial that fails does not stop the sweep; Tune retries
it (``max_failures``).

MLflow: one parent run for the sweep; each trial is its stage job's own run nested under it (one run
per trial, kept across retries); the parent gets the trials table, a plot of the metric against each
swept parameter, the best config and results.json; a train sweep registers the best trial's model.

Ray: :func:`run_sweep` runs on the cluster this process already joined. The entry points start or
join it: ``heygen-ray tune`` (and ``jobs/tune.py``, which runs that command) calls
``heygen_ray.runtime.init_ray(spec.ray)`` once the plan is valid, as ``heygen-ray pipeline run``
does before all its stages.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from heygen_ray.config import ConfigError, SweepSpec, TrainSpec
from heygen_ray.tune.compress import COMPRESS_STAGE
from heygen_ray.tune.result import BestTrial, SweepResult, TrialSummary
from heygen_ray.tune.space import plain_values
from heygen_ray.tune.stage import (
    STATUS_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    Stage,
    SweepPlan,
    candidate_specs,
    clear_stop,
    data_swept,
    request_stop,
)
from heygen_ray.tune.train import TRAIN_STAGE

log = logging.getLogger(__name__)

STAGES: Dict[str, Stage] = {s.name: s for s in (TRAIN_STAGE, COMPRESS_STAGE)}


def stage_for(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:  # pragma: no cover - SweepSpec admits no other
        raise ConfigError(f"stage: no sweep adapter for {name!r}") from None


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Validate the sweep against its stage's spec (paths, sample types, metric, scheduler): no Ray.
    The spec's ``storage`` (when set) becomes the storage root its folders resolve under."""
    from heygen_ray import runtime

    if spec.storage:
        runtime.use_storage(spec.storage)
    return stage_for(spec.stage).plan(spec)


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------


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
    for _, stage_spec in candidate_specs(plan, ""):
        spec = plan.stage.train_of(stage_spec)
        workers = max(spec.scaling.num_workers, 0) * spec.scaling.cpus_per_worker
        need = max(need, plan.spec.trial_cpus + workers + _data_cpus(spec))
    return need


def concurrency_for(plan: SweepPlan, cluster_cpus: float) -> int:
    """Concurrent trials that fit ``cluster_cpus`` (at most ``max_concurrent_trials``)."""
    need = trial_cpus(plan)
    trains = [plan.stage.train_of(s) for _, s in candidate_specs(plan, "")]
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
    plan.stage.check_concurrency(plan, n)
    return n


# --------------------------------------------------------------------------------------------------
# Search and early stopping
# --------------------------------------------------------------------------------------------------


def _graceful_asha(plan: SweepPlan, **kwargs):
    """ASHA whose STOP becomes a stop request the trial honours itself (see
    :func:`heygen_ray.tune.stage.request_stop`); a STOP at a trial's last planned step is ignored, so
    completed trials finish normally."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class GracefulASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision != TrialScheduler.STOP:
                return decision
            planned = plan.stage.planned_steps(plan, trial.config.get("params", {}))
            if int(result.get("step", 0) or 0) < planned:
                request_stop(trial.trial_id)
            return TrialScheduler.CONTINUE

    return GracefulASHA(**kwargs)


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


# --------------------------------------------------------------------------------------------------
# The sweep (driver)
# --------------------------------------------------------------------------------------------------


def run_sweep(spec: SweepSpec, *, plan: Optional[SweepPlan] = None) -> SweepResult:
    """Run the sweep; returns its :class:`SweepResult` and writes results.json, trials.csv and
    best_config.yaml under the sweep's folder. Raises RuntimeError when no trial completed.

    Plans first (``plan`` when given, else :func:`plan_sweep`): a bad config or search space fails
    before anything touches Ray. Ray must then be initialised: this is a library function, the
    entry points own ``ray.init`` (``heygen-ray tune`` and ``jobs/tune.py`` call
    ``heygen_ray.runtime.init_ray(spec.ray)`` after planning, ``heygen-ray pipeline run`` before it
    plans its stages' runs)."""
    import ray
    from ray import tune

    from heygen_ray import runtime
    from heygen_ray import tracking as t

    t0 = time.perf_counter()
    plan = plan or plan_sweep(spec)  # fails here, before Ray is used, on a bad config or search space
    runtime.require_ray(f"sweep {spec.name}")
    stage = plan.stage
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
            tune.with_resources(tune.with_parameters(stage.trainable(), ctx=ctx, **trial_kwargs), {"CPU": spec.trial_cpus}),
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
        result = _summarise(plan, recorder, parent, trk, info.to_dict(), concurrency, time.perf_counter() - t0)
        status = "FINISHED" if result.best is not None else "FAILED"
    finally:
        parent.end(status)
    if result.best is None:
        raise RuntimeError(f"sweep {spec.name}: no trial completed; see {result.trials_csv}")
    return result


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


def _trial_rows(plan: SweepPlan, recorder, runs: Dict[str, Dict[str, Any]]) -> List[TrialSummary]:
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
        rows.append(TrialSummary(trial_id=trial_id, status=status, params=dict(rec["params"]), step=step,
                                 planned_steps=planned, reports=len(rec["results"]), retries=rec["retries"],
                                 mlflow_run_id=(runs.get(trial_id) or {}).get("run_id"), error=error,
                                 metrics={m: last.get(m) for m, _ in plan.objectives}))
    return rows


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


def _summarise(plan: SweepPlan, recorder, parent, trk, info: Dict[str, Any], concurrency: int,
               seconds: float) -> SweepResult:
    from heygen_ray import tracking as t

    spec = plan.spec
    runs: Dict[str, Dict[str, Any]] = {}
    if trk.enabled:
        for r in t.find_runs(trk.tracking_uri, trk.experiment, parent_run_id=parent.run_id):
            runs[r["tags"].get(TRIAL_TAG, r["run_id"])] = r
    summaries = _trial_rows(plan, recorder, runs)
    rows = [s.to_row() for s in summaries]

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
    result = SweepResult(
        name=spec.name, task=plan.task, metric=plan.metric, mode=plan.mode, objectives=list(plan.objectives),
        trials=len(rows), trials_completed=counts["completed"], trials_stopped_early=counts["stopped_early"],
        trials_error=counts["error"], concurrency=concurrency, seconds=round(seconds, 1),
        sweep_dir=plan.sweep_dir, trials_csv=trials_csv, mlflow_parent_run_id=parent.run_id,
        tracking_uri=trk.tracking_uri if trk.enabled else None, summary_plot=plot, pareto_front=front,
        extra=dict(plan.extra), rows=summaries,
    )
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
        result.best = BestTrial(trial_id=best["trial_id"], mlflow_run_id=best["mlflow_run_id"], metric=best[plan.metric],
                                params=params, step=best["step"],
                                objectives={m: best.get(m) for m, _ in plan.objectives[1:]})
        result.best_config_path = best_path
        name = spec.tracking.registered_model_name or ((plan.base.get("tracking") or {}).get("registered_model_name"))
        if plan.stage.register_best and trk.enabled and name and best["mlflow_run_id"]:
            reg = t.register_run_model(trk.tracking_uri, best["mlflow_run_id"], name,
                                       version_tags={SWEEP_TAG: spec.name, TRIAL_TAG: best["trial_id"],
                                                     plan.metric: f"{best[plan.metric]:.6g}"})
            result.registered_model_name, result.model_version, result.model_uri = name, reg.version, reg.model_uri
        parent.log_metrics({f"best_{plan.metric}": best[plan.metric]})
        parent.set_tags({"heygen_ray.best_trial_id": best["trial_id"], "heygen_ray.best_run_id": str(best["mlflow_run_id"])})
    parent.log_metrics({"trials": len(rows), **{f"trials_{k}": v for k, v in counts.items()}})
    result.data_info = {k: v for k, v in info.items() if k != "mean_clip"}
    results_path = os.path.join(plan.sweep_dir, "results.json")
    with open(results_path, "w") as f:
        json.dump(result.results_json(), f, indent=2, default=str)
    parent.log_artifact(results_path, "summary")
    result.results_path = results_path
    return result


__all__ = [
    "STAGES", "STATUS_TAG", "SWEEP_TAG", "TRIAL_TAG", "BestTrial", "Stage", "SweepPlan", "SweepResult", "TrialSummary",
    "concurrency_for", "pareto_front", "plan_sweep", "run_sweep", "stage_for", "trial_cpus",
]
