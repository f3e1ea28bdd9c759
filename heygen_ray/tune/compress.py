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

CPUs: a trial holds its driver (``SweepSpec.trial_cpus``) plus its distillation run's Train workers
and video decoder, which the launcher counts from ``train.scaling`` and ``train.data.video``
(:meth:`CompressStage.train_of`) as for a training sweep (on 2 CPUs with the shipped sizes: one
trial at a time).
The trial's own measurements (pruning, int8 calibration and compilation, latencies) run in the trial
actor while its workers are gone; Ray starts that actor with OMP_NUM_THREADS=1 (its CPU is fractional)
unless the environment sets it, so every trial measures latency on one thread (``measure.threads``
sets another count).
"""

from __future__ import annotations

import copy
import difflib
import logging
from typing import Any, Callable, Dict, Mapping, Tuple

from heygen_ray import fsutil
from heygen_ray.config import CompressSpec, ConfigError, Spec, SweepSpec, TrainSpec, validate_spec
from heygen_ray.tune.space import SearchSpace
from heygen_ray.tune.stage import (
    Stage,
    SweepPlan,
    check_searchable,
    drop_sweep_tracking,
    enter_trial,
    load_base,
    nest_trial_tracking,
    objectives_of,
    sweep_dir_of,
    with_values,
)
from heygen_ray.uris import is_model_uri

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
    if teacher and "://" not in teacher and not is_model_uri(teacher):
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
    objectives = objectives_of(spec, lambda: ("quality", get_task(task).primary_mode))
    metric, mode = objectives[0]
    for name, _ in objectives:
        if name not in REPORT_KEYS:
            close = difflib.get_close_matches(name, REPORT_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"metric {name!r} is not reported by a compress trial{hint}; reported: {', '.join(REPORT_KEYS)}")
    steps = [_planned(base)] + [_planned(space.apply(v)) for v in space.samples_to_check()]
    return SweepPlan(spec=spec, base=base, portable=portable, space=space, metric=metric, mode=mode,
                     objectives=objectives, sweep_dir=sweep_dir_of(spec), max_steps=max(steps), grace_period=0,
                     task=task, stage=COMPRESS_STAGE)


def check_compress(plan: SweepPlan) -> Tuple[Dict[str, Any], Any]:
    """On Ray, before any trial: prepare the base's data once (trials must not race to generate it)."""
    from heygen_ray.train.driver import prepare_data
    from heygen_ray.train.prepare import task_for

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
        uri = out.checkpoint_uri
        if not uri:
            raise RuntimeError(f"sweep {plan.spec.name}: the teacher's training left no checkpoint")
        plan.extra["teacher_model_uri"] = out.model_uri
        plan.extra["teacher_metrics"] = out.metrics
    plan.extra["teacher_uri"] = uri
    ctx["teacher_uri"] = uri


def compress_trial_spec(ctx: Mapping[str, Any], values: Mapping[str, Any], trial_id: str) -> CompressSpec:
    """The trial's CompressSpec: base + sampled values, the sweep's teacher, its own name and folder,
    tracking nested under the sweep's run, no registry versions, no extra exports, no reference variants
    but the bf16 teacher. Re-validated here (a sampled float
    for an int field fails loudly, naming the path)."""
    d = with_values(ctx["base"], values)
    d["name"] = f"{ctx['name']}_{trial_id}"
    d["run_dir"] = ctx["trials_dir"]
    if ctx.get("teacher_uri"):
        d["teacher"] = ctx["teacher_uri"]
    d["registered_model_name"] = None  # trials measure; the best config, re-run, registers
    d["quantize"]["export_pt2"] = False  # nor do they export the fp32/bf16 students (not what they report)
    d["measure"]["variants"] = ["teacher_bf16"]  # what a trial reports: the final variant, its speedups vs fp32/bf16
    nest_trial_tracking(d, ctx, trial_id)
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
    import ray.tune

    from heygen_ray.compress.stage import run_compression

    trial_id = enter_trial(ctx)
    spec = compress_trial_spec(ctx, config["params"], trial_id)
    out = run_compression(spec).to_dict()
    ray.tune.report(trial_result(out, spec))


def best_compress_config(plan: SweepPlan, params: Mapping[str, Any]) -> Dict[str, Any]:
    """The best trial as a ready-to-run compression YAML (as written: relative paths kept), with the
    sweep's teacher, so a re-run compresses the model the sweep measured (and registers its variants)."""
    d = with_values(plan.portable, params)
    d["name"] = f"{plan.spec.name}_best"
    if plan.extra.get("teacher_uri"):
        d["teacher"] = plan.extra["teacher_uri"]
    drop_sweep_tracking(d)
    CompressSpec.from_dict(d, source="best config")  # it must load as it is written
    return d


class CompressStage(Stage):
    name = "compress"
    spec_cls = CompressSpec
    run_command = "heygen-ray compress"
    register_best = False  # trials measure; the best config, re-run, registers its variants

    def plan(self, spec: SweepSpec) -> SweepPlan:
        return plan_compress(spec)

    def check(self, plan: SweepPlan) -> Tuple[Dict[str, Any], Any]:
        return check_compress(plan)

    def before_trials(self, plan: SweepPlan, ctx: Dict[str, Any]) -> None:
        teacher_for_trials(plan, ctx)

    def trainable(self) -> Callable[..., None]:
        return run_compress_trial

    def train_of(self, spec: Spec) -> TrainSpec:
        return spec.train

    def planned_steps(self, plan: SweepPlan, params: Mapping[str, Any]) -> int:
        return _planned(plan.space.apply(params))

    def best_config(self, plan: SweepPlan, params: Mapping[str, Any]) -> Dict[str, Any]:
        return best_compress_config(plan, params)

    def check_concurrency(self, plan: SweepPlan, concurrent: int) -> None:
        if concurrent > 1:
            log.warning("%d compress trials at a time: their latency measurements share the machine's cores "
                        "(set max_concurrent_trials: 1 for latencies measured alone)", concurrent)


COMPRESS_STAGE = CompressStage()
