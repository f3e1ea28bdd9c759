"""Training's view of tracking: the driver opens the MLflow run, every attempt of rank 0 logs into it.

The driver creates the run before the workers start, so a worker restart (or a re-run job that
resumes) keeps logging into the same run instead of scattering attempts over several runs. Other
ranks, and everything when tracking is disabled, get a `NullTracker`: call sites carry no rank checks.
(`heygen_ray.tracking` imports mlflow only inside its functions, so importing it here is cheap.)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

from heygen_ray import tracking as t

log = logging.getLogger(__name__)

# <run_dir>/<name>/mlflow_run.json: the run a job of this name logs to, so that the same job submitted
# again (after `ray job stop`, a crash, or with edited code) resumes its checkpoint *and* its MLflow run
RUN_RECORD = "mlflow_run.json"


def resolved_uri(tracking: Dict[str, Any], run_dir: str) -> Optional[str]:
    return t.resolve_tracking_uri(tracking, run_dir) if tracking.get("enabled", True) else None


def start_training_run(tracking: Dict[str, Any], run_dir: str, *, run_name: str, spec: Dict[str, Any],
                       run_id: Optional[str] = None) -> Optional[str]:
    """Open the job's run (or reopen ``run_id``, e.g. for a retried sweep trial) and log the resolved
    spec; None when tracking is disabled."""
    if not tracking.get("enabled", True):
        return None
    tr = t.make_tracker(tracking, run_dir, rank=0, run_name=run_name, nested_under=tracking.get("parent_run_id"),
                        run_id=run_id)
    tr.start()
    if run_id is not None:
        tr.reopen()
    try:
        tr.log_params(spec)
    except Exception as err:  # noqa: BLE001 - MLflow refuses to change a logged param: a resumed job's edited spec
        if run_id is None:
            raise
        log.warning("run %s continues with a changed spec (%s); its params keep the first values", run_id, err)
        tr.set_tags({"heygen_ray.spec_changed_on_resume": "true"})
    tr.log_dict(spec, "config/spec.json")
    return tr.run_id


def previous_run(run_dir: str, tracking_uri: Optional[str]) -> Optional[str]:
    """The MLflow run an earlier job of this run folder opened on the same tracking store, or None."""
    try:
        with open(os.path.join(run_dir, RUN_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record.get("run_id") if tracking_uri and record.get("tracking_uri") == tracking_uri else None


def record_run(run_dir: str, tracking_uri: Optional[str], run_id: Optional[str]) -> None:
    if run_id is None:
        return
    with open(os.path.join(run_dir, RUN_RECORD), "w") as f:
        json.dump({"tracking_uri": tracking_uri, "run_id": run_id}, f)


def continue_or_start_run(tracking: Dict[str, Any], run_dir: str, *, run_name: str, spec: Dict[str, Any],
                          run_id: Optional[str] = None) -> Optional[str]:
    """``run_id`` when given (a retried trial, a resumed pipeline stage); else the run this folder's
    previous job recorded, reopened, when the store still has it; else a new run. The id is recorded
    for the next submission."""
    uri = resolved_uri(tracking, run_dir)
    earlier = run_id or previous_run(run_dir, uri)
    try:
        rid = start_training_run(tracking, run_dir, run_name=run_name, spec=spec, run_id=earlier)
    except Exception as err:  # noqa: BLE001 - the recorded run is gone (a new store): open a new one
        if run_id is not None or earlier is None:
            raise
        log.warning("MLflow run %s recorded in %s is not in %s (%s); starting a new run", earlier, run_dir, uri, err)
        rid = start_training_run(tracking, run_dir, run_name=run_name, spec=spec)
    if earlier is not None and rid == earlier and run_id is None:
        log.warning("continuing MLflow run %s of the earlier job %r", rid, run_name)
    record_run(run_dir, uri, rid)
    return rid


def attach(tracking: Dict[str, Any], run_dir: str, *, rank: int, run_id: Optional[str], resilient: bool = False):
    """A tracker on the driver's run for rank 0, a NullTracker for the other ranks or without a run.
    ``resilient`` (a training worker): a :class:`~heygen_ray.tracking.ResilientTracker`, so a tracking
    server that goes away mid-run costs the training nothing but the calls it names afterwards."""
    if run_id is None:
        return t.NullTracker()
    tracker = t.make_tracker(tracking, run_dir, rank=rank, run_name="", run_id=run_id)
    if not resilient or not tracker.enabled:
        return tracker
    # MLflow's own HTTP retries back off for minutes on a refused connection: fail fast, the wrapper retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return t.ResilientTracker(tracker)


def end_run(tracking: Dict[str, Any], run_dir: str, run_id: Optional[str], status: str) -> None:
    """Close the run; a tracking server that is down leaves it open (the training's results stand)."""
    try:
        attach(tracking, run_dir, rank=0, run_id=run_id).end(status)
    except Exception as err:  # noqa: BLE001 - the server's state must not fail a finished training
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)


def log_final_model(tracker, model, *, spec, info, task, overrides: Dict[str, Any],
                    precision: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Log (and register, when a name is configured) the final model; returns its URI and version
    (None on a NullTracker). What the model needs to run elsewhere travels in its model.json: the
    label names, clip shape and text settings (``data_info``) and the tokenizer itself
    (``data_info.tokenizer_json``), so a replica on another node needs the registry alone."""
    data_info = info.to_dict()
    if info.tokenizer_dir and tracker.enabled:
        from heygen_ray.data.text import TextTokenizer

        data_info["tokenizer_json"] = TextTokenizer.load(info.tokenizer_dir).to_json()
    target = tracker.inner if isinstance(tracker, t.ResilientTracker) else tracker
    try:
        logged = t.log_model(
            target, model, model_name=spec.model.name, model_overrides=overrides,
            registered_model_name=spec.tracking.registered_model_name,
            input_example=task.inputs(task.example_batch(info, 1))[0],
            extra={"task": spec.task, "precision": precision or spec.precision, "variant": "ema" if spec.ema.enabled else "raw",
                   "data_info": data_info},
        )
    except Exception as err:
        if target is tracker:
            raise
        tracker.record_failure("log_model (the final model; its weights are in the last checkpoint)", err)
        return None
    if logged is None:
        return None
    return {"model_uri": logged.model_uri, "registered_model_name": logged.registered_name,
            "model_version": logged.version, "mlflow_run_id": logged.run_id}
