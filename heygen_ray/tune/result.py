"""What a sweep returns: :class:`SweepResult`, with the best trial and one summary per trial.

``SweepResult.to_dict()`` is the sweep's results.json plus two keys that stay in memory
(``results_path`` and ``rows``, the per-trial summaries as flat trials.csv rows);
:meth:`SweepResult.results_json` is exactly what the file holds, key order included, and
:meth:`SweepResult.from_dict` reads either back. Imports nothing else from ``heygen_ray.tune``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

PARAM_PREFIX = "param:"  # a trials.csv column of a swept path: param:<path>

# keys of to_dict() that results.json does not hold
_MEMORY_ONLY = ("results_path", "rows")


@dataclass
class TrialSummary:
    """How one trial ended, as a row of trials.csv."""

    trial_id: str
    status: str  # completed | stopped_early | error
    params: Dict[str, Any]  # the trial's {path: value}
    step: int  # the last step it reported
    planned_steps: int  # the step it reports last when it completes
    reports: int  # results it reported to Tune
    retries: int  # Tune-level restarts after a failure
    mlflow_run_id: Optional[str]
    error: Optional[str]  # the last line of the error of a trial that failed for good
    metrics: Dict[str, Any] = field(default_factory=dict)  # each objective's last reported value (None if never)

    def to_row(self) -> Dict[str, Any]:
        """The flat row (trials.csv's columns, in order): ``param:<path>`` per swept path, then the
        objectives' metrics under their own names."""
        return {"trial_id": self.trial_id, "status": self.status,
                **{f"{PARAM_PREFIX}{k}": v for k, v in self.params.items()},
                "step": self.step, "planned_steps": self.planned_steps, "reports": self.reports,
                "retries": self.retries, "mlflow_run_id": self.mlflow_run_id, "error": self.error, **self.metrics}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "TrialSummary":
        fixed = ("trial_id", "status", "step", "planned_steps", "reports", "retries", "mlflow_run_id", "error")
        return cls(trial_id=row["trial_id"], status=row["status"],
                   params={k[len(PARAM_PREFIX):]: v for k, v in row.items() if k.startswith(PARAM_PREFIX)},
                   step=row["step"], planned_steps=row["planned_steps"], reports=row["reports"], retries=row["retries"],
                   mlflow_run_id=row.get("mlflow_run_id"), error=row.get("error"),
                   metrics={k: v for k, v in row.items() if k not in fixed and not k.startswith(PARAM_PREFIX)})


@dataclass
class BestTrial:
    """The best completed trial: on the primary objective, ties broken by the next objectives."""

    trial_id: str
    mlflow_run_id: Optional[str]  # its MLflow run (the one whose model is registered)
    metric: float  # its value of the sweep's primary metric
    params: Dict[str, Any]  # its {path: value}
    step: int
    objectives: Dict[str, Any] = field(default_factory=dict)  # its values of the further objectives

    def to_dict(self) -> Dict[str, Any]:
        return {"trial_id": self.trial_id, "mlflow_run_id": self.mlflow_run_id, "metric": self.metric,
                "params": dict(self.params), "step": self.step, **self.objectives}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BestTrial":
        fixed = ("trial_id", "mlflow_run_id", "metric", "params", "step")
        return cls(trial_id=d["trial_id"], mlflow_run_id=d.get("mlflow_run_id"), metric=d["metric"],
                   params=dict(d.get("params") or {}), step=d["step"],
                   objectives={k: v for k, v in d.items() if k not in fixed})


@dataclass
class SweepResult:
    """What :func:`heygen_ray.tune.sweep.run_sweep` returns (and writes as <sweep_dir>/results.json)."""

    name: str
    task: str
    metric: str  # the primary objective
    mode: str  # min | max
    objectives: List[Tuple[str, str]]  # (metric, mode), the primary first
    trials: int  # how many trials ran
    trials_completed: int
    trials_stopped_early: int
    trials_error: int
    concurrency: int  # trials run at once
    seconds: float
    sweep_dir: str
    trials_csv: str
    mlflow_parent_run_id: Optional[str]  # the sweep's MLflow run (each trial's run is nested under it)
    tracking_uri: Optional[str]  # None when tracking is off
    summary_plot: Optional[str]  # the metric-vs-parameters plot logged to the sweep's run
    best: Optional[BestTrial] = None
    best_config_path: Optional[str] = None  # the best trial as a ready-to-run YAML of its stage
    model_version: Optional[str] = None  # the best trial's model, registered (train sweeps)
    registered_model_name: Optional[str] = None
    model_uri: Optional[str] = None
    pareto_front: Optional[List[str]] = None  # trial ids (multi-objective sweeps)
    extra: Dict[str, Any] = field(default_factory=dict)  # the stage's own results (compress: teacher_uri, ...)
    data_info: Dict[str, Any] = field(default_factory=dict)
    results_path: Optional[str] = None  # <sweep_dir>/results.json once written
    rows: List[TrialSummary] = field(default_factory=list)  # one per trial

    @property
    def best_trial_dir(self) -> Optional[str]:
        """The best trial's own run folder (its checkpoints, its results.json)."""
        if self.best is None:
            return None
        return os.path.join(self.sweep_dir, "trials", f"{self.name}_{self.best.trial_id}")

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """results.json's content, then ``results_path`` and ``rows`` (flat trials.csv rows)."""
        return {
            "name": self.name, "task": self.task, "metric": self.metric, "mode": self.mode,
            "objectives": [{"metric": m, "mode": d} for m, d in self.objectives],
            "trials": self.trials, "trials_completed": self.trials_completed,
            "trials_stopped_early": self.trials_stopped_early, "trials_error": self.trials_error,
            "concurrency": self.concurrency, "seconds": self.seconds,
            "sweep_dir": self.sweep_dir, "trials_csv": self.trials_csv,
            "mlflow_parent_run_id": self.mlflow_parent_run_id, "tracking_uri": self.tracking_uri,
            "summary_plot": self.summary_plot, "best": self.best.to_dict() if self.best is not None else None,
            "best_config_path": self.best_config_path, "model_version": self.model_version,
            "registered_model_name": self.registered_model_name, "model_uri": self.model_uri,
            "pareto_front": self.pareto_front, **self.extra, "data_info": self.data_info,
            "results_path": self.results_path, "rows": [r.to_row() for r in self.rows],
        }

    def results_json(self) -> Dict[str, Any]:
        """What results.json holds."""
        return {k: v for k, v in self.to_dict().items() if k not in _MEMORY_ONLY}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepResult":
        """From :meth:`to_dict` or a results.json (then ``rows`` is empty and ``results_path`` None)."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        best = d.get("best")
        return cls(
            name=d["name"], task=d["task"], metric=d["metric"], mode=d["mode"],
            objectives=[(o["metric"], o["mode"]) for o in d.get("objectives", [])],
            trials=d["trials"], trials_completed=d["trials_completed"], trials_stopped_early=d["trials_stopped_early"],
            trials_error=d["trials_error"], concurrency=d["concurrency"], seconds=d["seconds"],
            sweep_dir=d["sweep_dir"], trials_csv=d["trials_csv"], mlflow_parent_run_id=d.get("mlflow_parent_run_id"),
            tracking_uri=d.get("tracking_uri"), summary_plot=d.get("summary_plot"),
            best=BestTrial.from_dict(best) if best else None, best_config_path=d.get("best_config_path"),
            model_version=d.get("model_version"), registered_model_name=d.get("registered_model_name"),
            model_uri=d.get("model_uri"), pareto_front=d.get("pareto_front"),
            extra={k: v for k, v in d.items() if k not in known},
            data_info=dict(d.get("data_info") or {}), results_path=d.get("results_path"),
            rows=[TrialSummary.from_row(r) for r in d.get("rows") or []],
        )


__all__ = ["BestTrial", "SweepResult", "TrialSummary"]
