"""Training's view of tracking: the driver opens the MLflow run, every attempt of rank 0 logs into it.

The driver creates the run before the workers start, so a worker restart (or a re-run job that
resumes) keeps logging into the same run instead of scattering attempts over several runs. Other
ranks, and everything when tracking is disabled, get a null tracker: call sites carry no rank checks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple


class _Null:
    run_id: Optional[str] = None

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def resolved_uri(tracking: Dict[str, Any], run_dir: str) -> Optional[str]:
    if not tracking.get("enabled", True):
        return None
    from heygen_ray import tracking as t

    return t.resolve_tracking_uri(t.TrackingSpec.from_dict(tracking), run_dir)


def start_training_run(tracking: Dict[str, Any], run_dir: str, *, run_name: str, spec: Dict[str, Any]) -> Optional[str]:
    """Open (or reopen, when a job with the same name resumes) the run; log the resolved spec."""
    if not tracking.get("enabled", True):
        return None
    from heygen_ray import tracking as t

    tr = t.make_tracker(tracking, run_dir, rank=0, run_name=run_name, nested_under=tracking.get("parent_run_id"))
    tr.start()
    tr.log_params(spec)
    tr.log_dict(spec, "config/spec.json")
    return tr.run_id


def end_run(tracking: Dict[str, Any], run_dir: str, run_id: Optional[str], status: str) -> None:
    if run_id is None:
        return
    from heygen_ray import tracking as t

    t.make_tracker(tracking, run_dir, rank=0, run_name="", run_id=run_id).end(status)


def worker_tracker(tracking: Dict[str, Any], run_dir: str, *, rank: int, run_id: Optional[str]):
    if run_id is None or rank != 0 or not tracking.get("enabled", True):
        return _Null()
    from heygen_ray import tracking as t

    return t.make_tracker(tracking, run_dir, rank=rank, run_name="", run_id=run_id)


def log_final_model(tracker, model, *, spec, info, task) -> Optional[Dict[str, Any]]:
    """Log (and register, when a name is configured) the final model; returns its URI and version."""
    if isinstance(tracker, _Null):
        return None
    from heygen_ray import tracking as t

    overrides = {**task.model_overrides(info), **spec.model.overrides}
    example = {k: v[:1] for k, v in task.inputs(task.example_batch(info, 2))[0].items()}
    logged = t.log_model(
        tracker, model, model_name=spec.model.name, model_overrides=overrides,
        registered_model_name=spec.tracking.registered_model_name, input_example=example,
        extra={"task": spec.task, "precision": spec.precision, "variant": "ema" if spec.ema.enabled else "raw",
               "data_info": info.to_dict()},
    )
    return {"model_uri": logged.model_uri, "registered_model_name": logged.registered_name,
            "model_version": logged.version, "mlflow_run_id": logged.run_id}
