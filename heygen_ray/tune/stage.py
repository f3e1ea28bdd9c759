"""What a sweepable stage provides, and the helpers every stage's adapter shares.

The launcher (:mod:`heygen_ray.tune.sweep`) runs one Ray Tune Tuner whatever its trials run; a
:class:`Stage` adapter supplies the rest: the plan (the spec class the space is checked against, the
default metric and mode), the checks on Ray before any trial, the function trainable and how it
reports, the TrainSpec a trial's CPUs are counted from, the step a trial that completes reports last,
and the best trial written back as a ready-to-run config. The adapters are
:mod:`heygen_ray.tune.train` (one training job per trial) and :mod:`heygen_ray.tune.compress` (one
compression job per trial).

This module is the bottom of the ``tune`` package besides :mod:`heygen_ray.tune.space`: it imports
neither the adapters nor the launcher, and no Ray at import time.

A trial receives a context dict built by the launcher (``ctx``), pickled to the trial actor:
``base`` (the stage dict trials start from, paths absolute), ``name`` (the sweep's), ``trials_dir``,
``cwd`` (the driver's working directory) and ``tracking`` (``enabled``, ``tracking_uri``,
``experiment``, ``parent_run_id``, ``tags``); a stage's :meth:`Stage.before_trials` may add to it.
"""

from __future__ import annotations

import abc
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Tuple, Type

from heygen_ray import fsutil, ray_private
from heygen_ray.config import ConfigError, Spec, SweepSpec, TrainSpec, load_yaml, validate_spec
from heygen_ray.tune.space import SearchSpace, merge, non_primitive_choices, plain_values, set_path

log = logging.getLogger(__name__)

SWEEP_TAG = "heygen_ray.sweep"
TRIAL_TAG = "heygen_ray.trial_id"
STATUS_TAG = "heygen_ray.trial_status"


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
    stage: "Stage"  # the adapter that planned it
    extra: Dict[str, Any] = field(default_factory=dict)  # the stage's own results (written into results.json)

    @property
    def trials_dir(self) -> str:
        return os.path.join(self.sweep_dir, "trials")


class Stage(abc.ABC):
    """What the sweep launcher needs from the stage its trials run (``SweepSpec.stage``).

    The methods after :meth:`plan` get the :class:`SweepPlan` that it built."""

    name: str  # the SweepSpec.stage value
    spec_cls: Type[Spec]  # what the base YAML and every sampled config must validate as
    run_command: str  # how the best config is run (written into its header)
    register_best: bool  # register the best trial's logged model in the MLflow registry

    @abc.abstractmethod
    def plan(self, spec: SweepSpec) -> SweepPlan:
        """Validate everything that can be checked without Ray (base, space, metric names,
        scheduler) and choose the default metric/mode."""

    @abc.abstractmethod
    def check(self, plan: SweepPlan) -> Tuple[Dict[str, Any], Any]:
        """On Ray, before the sweep's MLflow run opens: prepare what trials share. Returns (extra
        keyword arguments of every trial, the data info written into results.json)."""

    def before_trials(self, plan: SweepPlan, ctx: Dict[str, Any]) -> None:
        """After the sweep's MLflow run opened, before the Tuner starts: may add to the trials' ``ctx``."""

    @abc.abstractmethod
    def trainable(self) -> Callable[..., None]:
        """Tune's function trainable, a module-level function ``trial(config, ctx, **trial kwargs)``;
        ``config["params"]`` holds the trial's {path: value}. It reports its results to Tune (each
        carrying ``step`` and the objectives' metrics) and, when the scheduler asks it to stop
        (:func:`stop_requested`), ends normally."""

    @abc.abstractmethod
    def train_of(self, spec: Spec) -> TrainSpec:
        """The TrainSpec whose Train workers and data pipeline a trial's CPUs are counted from."""

    @abc.abstractmethod
    def planned_steps(self, plan: SweepPlan, params: Mapping[str, Any]) -> int:
        """The ``step`` a trial with these values reports last when it completes."""

    @abc.abstractmethod
    def best_config(self, plan: SweepPlan, params: Mapping[str, Any]) -> Dict[str, Any]:
        """The best trial as a ready-to-run config of this stage (as written: relative paths kept)."""

    def check_concurrency(self, plan: SweepPlan, concurrent: int) -> None:
        """Called with the number of trials that will run at once (may warn)."""


# --------------------------------------------------------------------------------------------------
# Planning helpers (no Ray)
# --------------------------------------------------------------------------------------------------


def load_base(spec: SweepSpec, spec_cls: Type[Spec]) -> Dict[str, Any]:
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


def objectives_of(spec: SweepSpec, default: Callable[[], Tuple[str, str]]) -> List[Tuple[str, str]]:
    """(metric, mode) of every objective, the primary first: the sweep's metric, else ``default()``
    (the stage's; only called when the sweep names no metric)."""
    if spec.metric is None:
        metric, mode = default()
    else:
        metric, mode = spec.metric, spec.mode or "max"
    return [(metric, mode)] + [(o.metric, o.mode) for o in spec.objectives]


def sweep_dir_of(spec: SweepSpec) -> str:
    """<run_dir>/<name>, absolute: the sweep's trials, Tune state, results and best config."""
    return os.path.join(fsutil.absolute(spec.run_dir), spec.name)


def candidate_specs(plan: SweepPlan, prefix: str) -> List[Tuple[str, Any]]:
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


# --------------------------------------------------------------------------------------------------
# Building a trial's config and the best config
# --------------------------------------------------------------------------------------------------


def with_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> Dict[str, Any]:
    """A deep copy of ``base`` with each dotted path of ``values`` set (numpy scalars made plain)."""
    d = json.loads(json.dumps(base))
    for path, value in plain_values(values).items():
        set_path(d, path, value)
    return d


def nest_trial_tracking(d: Dict[str, Any], ctx: Mapping[str, Any], trial_id: str) -> None:
    """Point the trial config ``d``'s tracking at the sweep's run (nested under it, tagged with the
    trial id) and keep the trial from registering models: only the sweep registers, the best trial's."""
    tracking = dict(d.get("tracking") or {})
    tracking.update(ctx["tracking"])
    tracking["tags"] = {**(d.get("tracking") or {}).get("tags", {}), **ctx["tracking"].get("tags", {}), TRIAL_TAG: trial_id}
    tracking["registered_model_name"] = None
    d["tracking"] = tracking


def drop_sweep_tracking(d: Dict[str, Any]) -> None:
    """A best config runs on its own: not nested under the sweep's (or any) run."""
    tracking = d.get("tracking") or {}
    tracking.pop("parent_run_id", None)
    if tracking:
        d["tracking"] = tracking


def enter_trial(ctx: Mapping[str, Any]) -> str:
    """Set up a trial actor; returns the trial id. Tune starts each trial in its own folder: relative
    paths in the configs are the user's, so the trial returns to the driver's working directory. Ray
    Data's progress bars are turned off (the Train workers inherit this context): one bar per trial
    would interleave on the driver's console."""
    import ray.data
    import ray.tune

    if os.path.isdir(ctx["cwd"]):
        os.chdir(ctx["cwd"])
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    return ray.tune.get_context().get_trial_id()


# --------------------------------------------------------------------------------------------------
# Early stopping that lets a trial shut down cleanly
# --------------------------------------------------------------------------------------------------
#
# When ASHA stops a trial, Tune would kill the trial's actor; its Train controller dies with it and
# the controller's worker placement group is then only released by Ray Train's detached cleaner,
# which finds the cluster through the state API (and fails when several local Ray instances run on
# one machine): the CPUs stay reserved and later trials wait forever. So the sweep's scheduler turns
# ASHA's STOP into a stop request (a flag in the cluster's key-value store); the trial's Train
# controller reads it after its next report and aborts itself through Ray Train's own abort path,
# which releases its workers and placement group; the trial then returns and Tune records it as
# finished (early). ASHA's STOP at the final report (max_t) is ignored, so completed trials log
# their model and close their run.


def _stop_key(trial_id: str) -> str:
    return f"sweep_stop:{trial_id}"


def request_stop(trial_id: str) -> None:
    ray_private.kv_put(_stop_key(trial_id), b"1")


def stop_requested(trial_id: str) -> bool:
    return ray_private.kv_exists(_stop_key(trial_id))


def clear_stop(trial_id: str) -> None:
    ray_private.kv_delete(_stop_key(trial_id))


def stop_callback(trial_id: str):
    """A Ray Train callback (runs on the trial's Train controller): abort the run once a stop is requested."""
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


__all__ = [
    "DATA_PATHS", "STATUS_TAG", "SWEEP_TAG", "TRIAL_TAG", "Stage", "SweepPlan", "candidate_specs", "check_searchable",
    "clear_stop", "data_swept", "drop_sweep_tracking", "enter_trial", "load_base", "nest_trial_tracking",
    "objectives_of", "request_stop", "stop_callback", "stop_requested", "sweep_dir_of", "with_values",
]
