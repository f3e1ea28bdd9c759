"""MLflow at the edge: runs, metrics, artifacts, and model versions (the only package that imports mlflow).

    tracker = make_tracker(spec.tracking, run_dir, rank=ctx.get_world_rank(), run_name="train",
                           nested_under=parent_run_id)
    with tracker:                                   # a NullTracker on ranks != 0 / when disabled
        tracker.log_params(spec.to_dict())          # flattened to dotted keys
        tracker.log_metrics({"train/loss": 0.3}, step=10)
        logged = log_model(tracker, ema_model, model_name="vit_video_micro", model_overrides={},
                           registered_model_name="video-cls")    # None on a NullTracker
    set_alias("video-cls", "champion", logged.version, tracking_uri=uri)
    model = load_model("models:/video-cls@champion", tracking_uri=uri)   # our nn.Module class

Every call goes through an `MlflowClient` bound to one tracking URI and an explicit run id, never the
fluent "active run" or `mlflow.set_tracking_uri` globals: a driver's parent run and a child run can
be open in one process, and nothing leaks between tests or jobs.

A logged model is an MLflow *pyfunc* model ("models from code", `tracking/pyfunc.py`):
`artifacts/model.safetensors` (weights) + `artifacts/model.json` (registry name, overrides, input
names, ...), so `mlflow.pyfunc.load_model(uri).predict({...numpy...})` works and `load_model(uri)`
returns the original class, for every model of the zoo, without per-architecture code and without
unpickling anything.

Layout: `runs.py` (URIs, experiments, params, trackers), `plots.py` (curves and confusion matrices as
PNG or SVG), `models.py` (logging, registering and loading models), `pyfunc.py` (the code MLflow
executes to serve a logged model). mlflow is imported inside functions only: importing this package
imports neither mlflow nor torch.
"""

from heygen_ray.config import TrackingSpec
from heygen_ray.tracking.models import (
    CONFIG_FILE,
    MAX_EXAMPLE_ELEMENTS,
    MODEL_FORMAT,
    WEIGHTS_FILE,
    LoggedModel,
    ModelRef,
    download_run_artifact,
    find_variant_version,
    load_model,
    load_model_and_config,
    load_model_config,
    load_pyfunc,
    log_model,
    recorded,
    recorded_data_info,
    register_run_model,
    resolve_model_uri,
    set_alias,
)
from heygen_ray.tracking.plots import svg_curves, svg_heatmap, svg_scatter
from heygen_ray.tracking.resilient import ResilientTracker
from heygen_ray.tracking.runs import (
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    TRUNCATION_MARKER,
    NullTracker,
    RunStatus,
    Tracker,
    default_artifact_root,
    ensure_experiment,
    find_runs,
    flatten,
    make_tracker,
    resolve_spec,
    resolve_tracking_uri,
)

__all__ = [
    "CONFIG_FILE",
    "MAX_EXAMPLE_ELEMENTS",
    "MAX_PARAM_VALUE",
    "MAX_TAG_VALUE",
    "MODEL_FORMAT",
    "TRUNCATION_MARKER",
    "WEIGHTS_FILE",
    "LoggedModel",
    "ResilientTracker",
    "ModelRef",
    "NullTracker",
    "RunStatus",
    "Tracker",
    "TrackingSpec",
    "default_artifact_root",
    "download_run_artifact",
    "find_variant_version",
    "load_model_config",
    "recorded",
    "recorded_data_info",
    "ensure_experiment",
    "find_runs",
    "flatten",
    "load_model",
    "load_model_and_config",
    "load_pyfunc",
    "log_model",
    "register_run_model",
    "make_tracker",
    "resolve_model_uri",
    "resolve_spec",
    "resolve_tracking_uri",
    "set_alias",
    "svg_curves",
    "svg_heatmap",
    "svg_scatter",
]
