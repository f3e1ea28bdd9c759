"""Sweeps of the compression stage (``SweepSpec.stage: compress``): one compression job per trial.

The base is a compression YAML (CompressSpec); the space's paths are CompressSpec paths
(``prune.ratio``, ``distill.temperature``, ``distill.alpha``, ``quantize.scheme``, ``train.steps``, ...),
checked by the same :class:`~heygen_ray.tune.space.SearchSpace` as training sweeps before Ray starts,
and re-validated in each trial.

Every trial compresses the same teacher: when the base has none, the sweep trains it once (nested
under the sweep's MLflow run) before the trials and hands its checkpoint directory to each of them.
The paths that would change the teacher, the data or the yardstick (``teacher``, ``teacher_steps``,
``train.task``, ``train.model``, ``train.data``, ``measure``) cannot be swept: trials would not be
comparable.

A trial runs :func:`~heygen_ray.compress.stage.run_compression` (its own name and folder under the
sweep, its run nested under the sweep's, no registry versions, neither the pt2 exports of the fp32/bf16
students nor the fp32-compiled reference variant: each costs compile time and none is reported) and reports ONE result to Tune: the
final variant's figures (``quality``, ``quality_delta`` vs the teacher, ``p50_ms_bs1``, ``p50_ms_bs8``,
``params``, ``size_bytes``, ...) and ``step`` (the distillation steps). With one report per trial there
is nothing for ASHA to stop early (``SweepSpec`` rejects ``scheduler.kind: asha`` for this stage);
quality vs latency is a multi-objective Optuna search and the sweep's Pareto front.

CPUs: a trial holds its driver (``trial_cpus``) plus its distillation run's Train workers and video
decoder, counted by :func:`heygen_ray.tune.sweep.trial_cpus` from ``train.scaling`` and
``train.data.video`` as for a training sweep (on 2 CPUs with the shipped sizes: one trial at a time).
The trial's own measurements (pruning, int8 calibration and compilation, latencies) run in the trial
actor while its workers are gone; Ray starts that actor with OMP_NUM_THREADS=1 (its CPU is fractional)
unless the environment sets it, so every trial measures latency on one thread (``measure.threads``
sets another count).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
from typing import Any, Dict, Mapping, Tuple

from heygen_ray import fsutil
from heygen_ray.config import CompressSpec, ConfigError, SweepSpec, TrainSpec, validate_spec
from heygen_ray.tune.space import SearchSpace, plain_values, set_path
from heygen_ray.tune.sweep import TRIAL_TAG, SweepPlan, Stage, check_searchable, load_base

log = logging.getLogger(__name__)

# what a compress trial reports to Tune (the final variant's figures, the teacher's quality, the step)
FINAL_KEYS = ("quality", "quality_delta", "params", "size_bytes", "flops_per_sample", "p50_ms_bs1", "p95_ms_bs1",
              "p50_ms_bs8", "p95_ms_bs8", "throughput_bs8", "speedup_bs1_vs_fp32", "speedup_bs1_vs_bf16",
              "speedup_bs8_vs_fp32", "speedup_bs8_vs_bf16")
REPORT_KEYS = FINAL_KEYS + ("teacher_quality", "teacher_p50_ms_bs1", "step")

# paths every trial must share: the teacher, the data it learned and is measured on, the yardstick;
# and those the trial sets itself
FIXED_PATHS = ("teacher", "teacher_steps", "train.task", "train.model", "train.data", "measure",
               "name", "run_dir", "tracking", "registered_model_name")

ROLE_TAG = "heygen_ray.sweep_role"


def _absolutize(spec: CompressSpec) -> CompressSpec:
    """Local relative paths -> absolute (trials and Train workers run in other folders)."""
    from heygen_ray.train.driver import absolutize

    d = spec.to_dict()
    d["run_dir"] = fsutil.absolute(d["run_dir"])
    d["train"] = absolutize(spec.train).to_dict()
    teacher = d.get("teacher")
    if teacher and "://" not in teacher and not teacher.startswith("models:/"):
        d["teacher"] = fsutil.absolute(teacher)
    return CompressSpec.from_dict(d)


def _planned(d: Mapping[str, Any]) -> int:
    """The step a compress trial reports: its distillation steps (0 when distillation is off)."""
    return int(d["train"]["steps"]) if d["distill"]["enabled"] else 0


def plan_compress(spec: SweepSpec) -> SweepPlan:
    """Validate a compression sweep before Ray starts: the base, every path and extreme sample, the
    metric names against what a compress trial reports."""
    from heygen_ray.train.tasks import get_task

    portable = load_base(spec, CompressSpec)
    base_spec = _absolutize(validate_spec(CompressSpec, portable, source=f"{spec.base} + sweep train"))
    base = base_spec.to_dict()
    space = SearchSpace(CompressSpec, base, spec.space)
    for path in space.paths:
        fixed = next((f for f in FIXED_PATHS if path == f or path.startswith(f + ".")), None)
        if fixed is not None:
            raise ConfigError(f"space.{path}: {fixed} is the same for every trial of a compression sweep (one teacher, "
                              "one data set, one measurement; the trial sets its own name, folder and tracking): set it "
                              "in the base or the sweep's train section")
    space.validate()
    check_searchable(spec, space)

    task = base_spec.train.task
    if spec.metric is None:
        metric, mode = "quality", get_task(task).primary_mode
    else:
        metric, mode = spec.metric, spec.mode or "max"
    objectives = [(metric, mode)] + [(o.metric, o.mode) for o in spec.objectives]
    for name, _ in objectives:
        if name not in REPORT_KEYS:
            close = difflib.get_close_matches(name, REPORT_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"metric {name!r} is not reported by a compress trial{hint}; reported: {', '.join(REPORT_KEYS)}")
    steps = [_planned(base)] + [_planned(space.apply(v)) for v in space.samples_to_check()]
    return SweepPlan(spec=spec, base=base, portable=portable, space=space, metric=metric, mode=mode,
                     objectives=objectives, sweep_dir=os.path.join(fsutil.absolute(spec.run_dir), spec.name),
                     max_steps=max(steps), grace_period=0, task=task)


def check_compress(plan: SweepPlan) -> Tuple[Dict[str, Any], Any]:
    """On Ray, before any trial: prepare the base's data once (trials must not race to generate it)."""
    from heygen_ray.train.driver import prepare_data
    from heygen_ray.train.loop import task_for

    tspec = TrainSpec.from_dict(plan.base["train"])
    _, info = prepare_data(tspec, task_for(tspec), lazy=True)
    return {}, info


def teacher_for_trials(plan: SweepPlan, ctx: Dict[str, Any]) -> None:
    """The teacher every trial compresses: the base's, or one trained here once (nested under the
    sweep's run, in <sweep>/<name>-teacher/). Its checkpoint directory goes to the trials and into
    the best config, whatever tracking store that config later uses."""
    from heygen_ray.compress.stage import train_teacher

    uri = plan.base.get("teacher")
    if uri is None:
        d = copy.deepcopy(plan.base)
        d["name"] = plan.spec.name
        d["run_dir"] = plan.sweep_dir
        d["tracking"] = {**d["tracking"], **ctx["tracking"], "tags": {**ctx["tracking"]["tags"], ROLE_TAG: "teacher"}}
        log.info("sweep %s: training the teacher every trial compresses (%d steps)", plan.spec.name, plan.base["teacher_steps"])
        out = train_teacher(CompressSpec.from_dict(d, source="the sweep's teacher"))
        uri = out.get("checkpoint_uri")
        if not uri:
            raise RuntimeError(f"sweep {plan.spec.name}: the teacher's training left no checkpoint")
        plan.extra["teacher_model_uri"] = out.get("model_uri")
        plan.extra["teacher_metrics"] = out.get("metrics", {})
    plan.extra["teacher_uri"] = uri
    ctx["teacher_uri"] = uri


def compress_trial_spec(ctx: Mapping[str, Any], values: Mapping[str, Any], trial_id: str) -> CompressSpec:
    """The trial's CompressSpec: base + sampled values, the sweep's teacher, its own name and folder,
    tracking nested under the sweep's run, no registry versions, no extra exports, no reference variants
    but the bf16 teacher. Re-validated here (a sampled float
    for an int field fails loudly, naming the path)."""
    d = json.loads(json.dumps(ctx["base"]))
    for path, value in plain_values(values).items():
        set_path(d, path, value)
    d["name"] = f"{ctx['name']}_{trial_id}"
    d["run_dir"] = ctx["trials_dir"]
    if ctx.get("teacher_uri"):
        d["teacher"] = ctx["teacher_uri"]
    d["registered_model_name"] = None  # trials measure; the best config, re-run, registers
    d["quantize"]["export_pt2"] = False  # nor do they export the fp32/bf16 students (not what they report)
    d["measure"]["variants"] = ["teacher_bf16"]  # what a trial reports: the final variant, its speedups vs fp32/bf16
    tracking = dict(d.get("tracking") or {})
    tracking.update(ctx["tracking"])
    tracking["tags"] = {**(d.get("tracking") or {}).get("tags", {}), **ctx["tracking"].get("tags", {}), TRIAL_TAG: trial_id}
    tracking["registered_model_name"] = None
    d["tracking"] = tracking
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return CompressSpec.from_dict(d, source=f"trial {trial_id} [{shown}]")


def trial_result(out: Mapping[str, Any], spec: CompressSpec) -> Dict[str, Any]:
    """The one result a compress trial reports: the final variant's figures, the teacher's quality."""
    rows = {r["variant"]: r for r in out["variants"]}
    final, teacher = rows[out["final_variant"]], rows["teacher_fp32"]
    result = {k: final[k] for k in FINAL_KEYS if isinstance(final.get(k), (int, float))}
    result.update(teacher_quality=teacher["quality"], teacher_p50_ms_bs1=teacher["p50_ms_bs1"],
                  step=_planned(spec.to_dict()))
    return result


def run_compress_trial(config: Dict[str, Any], ctx: Dict[str, Any]) -> None:
    """Tune's function trainable for a compression sweep: one compression job, one report."""
    import ray.data
    import ray.tune

    from heygen_ray.compress.stage import run_compression

    if os.path.isdir(ctx["cwd"]):
        os.chdir(ctx["cwd"])
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    trial_id = ray.tune.get_context().get_trial_id()
    spec = compress_trial_spec(ctx, config["params"], trial_id)
    out = run_compression(spec)
    ray.tune.report(trial_result(out, spec))


def best_compress_config(plan: SweepPlan, params: Mapping[str, Any]) -> Dict[str, Any]:
    """The best trial as a ready-to-run compression YAML (as written: relative paths kept), with the
    sweep's teacher, so a re-run compresses the model the sweep measured (and registers its variants)."""
    d = json.loads(json.dumps(plan.portable))
    for path, value in plain_values(params).items():
        set_path(d, path, value)
    d["name"] = f"{plan.spec.name}_best"
    if plan.extra.get("teacher_uri"):
        d["teacher"] = plan.extra["teacher_uri"]
    tracking = d.get("tracking") or {}
    tracking.pop("parent_run_id", None)
    if tracking:
        d["tracking"] = tracking
    CompressSpec.from_dict(d, source="best config")  # it must load as it is written
    return d


COMPRESS_STAGE = Stage(
    name="compress", spec_cls=CompressSpec, plan=plan_compress, check=check_compress, before_trials=teacher_for_trials,
    trial=run_compress_trial, train_of=lambda spec: spec.train,
    planned_steps=lambda plan, params: _planned(plan.space.apply(params)), best_config=best_compress_config,
    run_command="heygen-ray compress", register_best=False)
