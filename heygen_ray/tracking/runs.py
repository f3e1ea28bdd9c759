"""Runs: tracking URIs and experiments, flattened params, and the trackers (real on rank 0, null elsewhere).

Every call goes through an `MlflowClient` bound to one tracking URI and an explicit run id.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from heygen_ray.config import TrackingSpec
from heygen_ray.tracking.plots import (
    _image_format,
    _matrix_rows,
    _num,
    _png_curves,
    _png_heatmap,
    _png_scatter,
    svg_curves,
    svg_heatmap,
    svg_scatter,
)

# MLflow limits (mlflow/utils/validation.py: MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH,
# MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"

RunStatus = str  # "FINISHED" | "FAILED" | "KILLED"


# --------------------------------------------------------------------------------------------------
# URIs and experiments
# --------------------------------------------------------------------------------------------------


def _client(tracking_uri: Optional[str] = None):
    """An MlflowClient whose registry is the tracking backend itself (not a global registry URI)."""
    from mlflow import MlflowClient

    db = _sqlite_path(tracking_uri) if tracking_uri else None
    if db is not None and not os.path.exists(db):
        seed_sqlite_store(db)

    if tracking_uri is None:
        return MlflowClient()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///rel.db` -> `sqlite:////abs/rel.db` (Train workers chdir: relative paths move)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path, sep, query = uri[len(prefix):].partition("?")
        return prefix + os.path.abspath(path) + sep + query
    return uri


def _sqlite_path(uri: str) -> Optional[str]:
    """The database file of a `sqlite:////abs/x.db` URI (None for other backends and in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    return uri[len("sqlite:///"):].partition("?")[0] or None


def _template_path() -> str:
    """The migrated empty store of this MLflow version, cached per user (``$HEYGEN_RAY_CACHE`` or
    ``~/.cache/heygen_ray``)."""
    import mlflow

    from heygen_ray.hostcache import cache_root

    return os.path.join(cache_root(), f"mlflow-{mlflow.__version__}-empty.db")


def seed_sqlite_store(db: str) -> bool:
    """Create the sqlite store ``db`` from a cached empty one, unless it exists already.

    A new sqlite store runs MLflow's whole chain of schema migrations (3-8 s on 2 cores); every run
    directory gets its own store, so that cost recurs. The migrated empty database of the installed
    MLflow version is made once and copied; its only row, the "Default" experiment, is pointed at
    ``<database dir>/mlartifacts/0`` (where :func:`default_artifact_root` puts every experiment).
    The copy appears atomically: a concurrent creator (two Tune trials) either finds the finished
    store or creates it. Returns True when this call created it."""
    import shutil
    import sqlite3

    template = _template_path()
    if not os.path.exists(template):
        from mlflow import MlflowClient

        os.makedirs(os.path.dirname(template), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(template)) as tmp:
            fresh = os.path.join(tmp, "empty.db")
            MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments()  # creates and migrates
            os.replace(fresh, template)
    folder = os.path.dirname(os.path.abspath(db))
    os.makedirs(folder, exist_ok=True)
    tmp_db = os.path.join(folder, f".{os.path.basename(db)}.{os.getpid()}.tmp")
    shutil.copyfile(template, tmp_db)
    try:
        now = int(time.time() * 1000)
        with sqlite3.connect(tmp_db) as con:
            con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                        "WHERE experiment_id = 0", (os.path.join(folder, "mlartifacts", "0"), now, now))
        con.close()
        os.link(tmp_db, db)  # fails if another process created the store meanwhile
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp_db)


def _spec(spec: Union[TrackingSpec, Mapping[str, Any], None]) -> TrackingSpec:
    if spec is None:
        return TrackingSpec()
    if isinstance(spec, TrackingSpec):
        return spec
    return TrackingSpec.from_dict(spec, source="tracking")


def resolve_tracking_uri(spec: Union[TrackingSpec, Mapping[str, Any], None], run_dir: str) -> str:
    """spec.tracking_uri, else $MLFLOW_TRACKING_URI, else `sqlite:///<abs run_dir>/mlflow.db`.

    Relative sqlite paths are made absolute (against the current directory), so resolve in the
    driver and hand workers the result (`resolve_spec`): a Train worker's CWD is its own run dir.
    """
    spec = _spec(spec)
    uri = spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        uri = "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(run_dir)), "mlflow.db")
    return _absolute_sqlite(uri)


def resolve_spec(spec: Union[TrackingSpec, Mapping[str, Any], None], run_dir: str) -> TrackingSpec:
    """A copy of `spec` with `tracking_uri` resolved (call in the driver; pass `.to_dict()` on)."""
    spec = _spec(spec)
    return spec.model_copy(update={"tracking_uri": resolve_tracking_uri(spec, run_dir)})


def default_artifact_root(tracking_uri: str, run_dir: Optional[str]) -> Optional[str]:
    """Where a new experiment's artifacts go: None (the server decides) for http(s)/databricks;
    `<database dir>/mlartifacts` for a local sqlite file (beside the database, so every job that
    shares the database shares the artifact store); `<run_dir>/mlartifacts` for other SQL backends.
    Without an explicit location MLflow would use `./mlruns` of whichever process creates the
    experiment."""
    scheme = tracking_uri.split(":", 1)[0].lower()
    if scheme in ("http", "https") or scheme.startswith("databricks"):
        return None
    db = _sqlite_path(tracking_uri)
    if db is not None:
        return os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    if run_dir is not None:
        return os.path.join(os.path.abspath(os.path.expanduser(run_dir)), "mlartifacts")
    return None


def ensure_experiment(uri: str, name: str, artifact_root: Optional[str] = None) -> str:
    """The id of experiment `name` at `uri`, created (with `artifact_root`, if given) when missing.

    Safe against a concurrent creator (two Tune trials): "already exists" re-reads the experiment.
    A deleted experiment of that name is an error (MLflow keeps the name reserved).
    """
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        if artifact_root is not None and "://" not in artifact_root:
            os.makedirs(artifact_root, exist_ok=True)
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} (id {exp.experiment_id}) at {uri} is deleted: restore it "
            "(`mlflow experiments restore`) or use another experiment name"
        )
    return exp.experiment_id


def find_runs(tracking_uri: str, experiment: str, *, parent_run_id: Optional[str] = None,
              tags: Optional[Mapping[str, str]] = None) -> List[Dict[str, Any]]:
    """Runs of ``experiment`` (nested under ``parent_run_id`` and carrying ``tags``, when given),
    oldest first, as plain dicts: run_id, run_name, status, start_time, tags, params, metrics
    (latest values)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    clauses = []
    if parent_run_id:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    for k, v in (tags or {}).items():
        clauses.append(f"tags.`{k}` = '{v}'")
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses), max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        for r in page:
            out.append({"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
                        "start_time": r.info.start_time, "tags": dict(r.data.tags), "params": dict(r.data.params),
                        "metrics": dict(r.data.metrics)})
        token = page.token
        if not token:
            return out


# --------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} (strings, as MLflow params are).

    Lists/tuples become JSON strings, an empty dict becomes "{}" (so the key stays visible), None
    becomes "None"; values longer than MLflow's 6000-character limit are cut and end with
    TRUNCATION_MARKER.
    """
    out: Dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
            continue
        if isinstance(value, Mapping):
            text = "{}"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value), default=str)
        else:
            text = str(value)
        out[name] = _truncate(text, MAX_PARAM_VALUE)
    return out


def _chunks(items: List[Any], n: int) -> Iterable[List[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]



# --------------------------------------------------------------------------------------------------
# Trackers
# --------------------------------------------------------------------------------------------------


class NullTracker:
    """The tracker of ranks != 0 and of disabled tracking: every call is accepted and does nothing."""

    enabled = False
    run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    tracking_uri: Optional[str] = None

    def start(self) -> "NullTracker":
        return self

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def child(self, run_name: str, tags: Optional[Mapping[str, str]] = None) -> "NullTracker":
        return NullTracker()

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        return None

    def log_dict(self, obj: Any, file: str) -> None:
        return None

    def log_text(self, text: str, file: str) -> None:
        return None

    def log_bytes(self, data: bytes, file: str) -> None:
        return None

    def log_curve_plot(self, history: Mapping[str, Sequence[Tuple[float, float]]], file: str = "curves.png",
                       image_format: str = "auto") -> Optional[str]:
        return None

    def log_confusion_matrix(self, matrix: Any, label_names: Optional[Sequence[str]] = None,
                             file: str = "confusion_matrix", image_format: str = "auto") -> List[str]:
        return []

    def log_scatter_plot(self, panels: Mapping[str, Sequence[Tuple[Any, float, str]]], y_label: str,
                         file: str = "scatter.png", log_x: Sequence[str] = (), image_format: str = "auto") -> Optional[str]:
        return None

    def reopen(self) -> "NullTracker":
        return self

    def end(self, status: RunStatus = "FINISHED") -> None:
        return None


class Tracker:
    """One MLflow run, addressed by id through an `MlflowClient` (no fluent global state).

    `start()` (or `with tracker:`) creates the run; `end(status)` closes it (`with` ends it
    FINISHED, FAILED on an exception, KILLED on KeyboardInterrupt). Pickles as (uri, ids), so a
    started tracker can be sent to another process and keep logging to the same run.
    """

    enabled = True

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "heygen_ray",
        *,
        run_name: Optional[str] = None,
        parent_run_id: Optional[str] = None,
        tags: Optional[Mapping[str, str]] = None,
        artifact_root: Optional[str] = None,
        run_id: Optional[str] = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.artifact_root = artifact_root
        self.run_id: Optional[str] = run_id
        self.experiment_id: Optional[str] = None
        self._ended = False
        self._client_obj = None

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_client_obj"] = None
        return state

    def start(self) -> "Tracker":
        """Create the run (idempotent). Tags: spec tags + MLflow's context tags (user, source,
        git commit) + `mlflow.parentRunId` when nested."""
        if self.run_id is not None:
            if self.experiment_id is None:
                self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            return self
        from mlflow.tracking.context.registry import resolve_tags

        self.experiment_id = ensure_experiment(self.tracking_uri, self.experiment, self.artifact_root)
        tags = {k: _truncate(str(v), MAX_TAG_VALUE) for k, v in self.tags.items()}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, tags=resolve_tags(tags), run_name=self.run_name)
        self.run_id = run.info.run_id
        self.run_name = run.info.run_name
        return self

    def __enter__(self) -> "Tracker":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    def end(self, status: RunStatus = "FINISHED") -> None:
        """Close the run with `status` ("FINISHED", "FAILED" or "KILLED"); later calls do nothing."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self.run_id is None or self._ended:
            return
        self.client.set_terminated(self.run_id, status=status)
        self._ended = True

    def reopen(self) -> "Tracker":
        """Mark an existing run RUNNING again (a retried attempt continues the same run)."""
        self.client.update_run(self._rid(), status="RUNNING")
        self._ended = False
        return self

    def child(self, run_name: str, tags: Optional[Mapping[str, str]] = None) -> "Tracker":
        """A (not yet started) nested run under this one, in the same experiment."""
        self.start()
        return Tracker(self.tracking_uri, self.experiment, run_name=run_name, parent_run_id=self.run_id,
                       tags={**self.tags, **(tags or {})}, artifact_root=self.artifact_root)

    def _rid(self) -> str:
        if self.run_id is None or self.experiment_id is None:
            self.start()
        return self.run_id  # type: ignore[return-value]

    # -- logging ----------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flatten (dotted keys) and log; MLflow params are write-once (a changed value raises)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for chunk in _chunks(items, _PARAMS_PER_BATCH):
            self.client.log_batch(self._rid(), params=chunk)

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Log numbers (Python, numpy or 0-d tensors) at `step` (default 0), one batched call."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
        for chunk in _chunks(items, _METRICS_PER_BATCH):
            self.client.log_batch(self._rid(), metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        for chunk in _chunks(items, _PARAMS_PER_BATCH):
            self.client.log_batch(self._rid(), tags=chunk)

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a directory (its contents go under `artifact_path`)."""
        if os.path.isdir(local_path):
            self.client.log_artifacts(self._rid(), local_path, artifact_path)
        else:
            self.client.log_artifact(self._rid(), local_path, artifact_path)

    def log_bytes(self, data: bytes, file: str) -> None:
        """Write `data` as the run artifact `file` (e.g. "plots/curves.png")."""
        directory, name = os.path.split(file)
        with tempfile.TemporaryDirectory(prefix="heygen_ray_art_") as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(self._rid(), path, directory or None)

    def log_text(self, text: str, file: str) -> None:
        self.log_bytes(text.encode("utf-8"), file)

    def log_dict(self, obj: Any, file: str) -> None:
        """JSON (or YAML when `file` ends in .yaml/.yml)."""
        if file.endswith((".yaml", ".yml")):
            import yaml

            self.log_text(yaml.safe_dump(obj, sort_keys=False), file)
        else:
            self.log_text(json.dumps(obj, indent=2, default=str), file)

    def log_curve_plot(self, history: Mapping[str, Sequence[Tuple[float, float]]], file: str = "curves.png",
                       image_format: str = "auto") -> str:
        """Plot {metric: [(step, value), ...]} as one panel per metric; returns the artifact path.

        PNG when matplotlib is importable (or `file` ends in .png and it is), else SVG; the
        extension of `file` is set to match. `image_format` forces "png" or "svg"."""
        fmt = _image_format(file, image_format)
        out = os.path.splitext(file)[0] + "." + fmt
        if fmt == "png":
            self.log_bytes(_png_curves(history), out)
        else:
            self.log_text(svg_curves(history), out)
        return out

    def log_confusion_matrix(self, matrix: Any, label_names: Optional[Sequence[str]] = None,
                             file: str = "confusion_matrix", image_format: str = "auto") -> List[str]:
        """`<file>.csv` (rows: true, columns: predicted, with label headers) and a heat map
        `<file>.png|svg`; returns both artifact paths."""
        rows = _matrix_rows(matrix)
        n = len(rows)
        labels = [str(name) for name in label_names] if label_names is not None else [str(i) for i in range(n)]
        if any(len(r) != n for r in rows) or len(labels) != n:
            raise ValueError(f"confusion matrix must be square with one label per row; got {n} rows, "
                             f"row lengths {sorted({len(r) for r in rows})}, {len(labels)} labels")
        stem = os.path.splitext(file)[0]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["true\\predicted", *labels])
        for label, row in zip(labels, rows):
            writer.writerow([label, *[_num(v) for v in row]])
        self.log_text(buf.getvalue(), stem + ".csv")
        fmt = _image_format(stem + "." + image_format if image_format in ("png", "svg") else stem, image_format)
        image = stem + "." + fmt
        if fmt == "png":
            self.log_bytes(_png_heatmap(rows, labels), image)
        else:
            self.log_text(svg_heatmap(rows, labels), image)
        return [stem + ".csv", image]

    def log_scatter_plot(self, panels: Mapping[str, Sequence[Tuple[Any, float, str]]], y_label: str,
                         file: str = "scatter.png", log_x: Sequence[str] = (), image_format: str = "auto") -> str:
        """One panel per key of ``panels``: ``y_label`` against that key's x values (numbers, log
        scale for keys in ``log_x``, or categories), coloured by each point's group. PNG or SVG as
        for ``log_curve_plot``; returns the artifact path."""
        fmt = _image_format(file, image_format)
        out = os.path.splitext(file)[0] + "." + fmt
        if fmt == "png":
            self.log_bytes(_png_scatter(panels, y_label, log_x), out)
        else:
            self.log_text(svg_scatter(panels, y_label, log_x), out)
        return out



def make_tracker(
    spec: Union[TrackingSpec, Mapping[str, Any], None],
    run_dir: str,
    *,
    rank: int = 0,
    run_name: Optional[str] = None,
    nested_under: Union[str, Tracker, NullTracker, None] = None,
    tags: Optional[Mapping[str, str]] = None,
    run_id: Optional[str] = None,
) -> Union[Tracker, NullTracker]:
    """A Tracker on rank 0 with tracking enabled, else a NullTracker (so call sites need no rank checks).

    `nested_under` (a run id or a Tracker) overrides `spec.parent_run_id`. The run is created by
    `start()` / `with` (or on the first log call), not here; with `run_id`, the tracker attaches
    to that existing run instead (e.g. one the driver opened; `end()` then closes it). The URI is
    resolved here when the spec leaves it open: prefer `resolve_spec` in the driver so workers
    need not agree on environment variables or CWDs.
    """
    spec = _spec(spec)
    if rank != 0 or not spec.enabled:
        return NullTracker()
    uri = resolve_tracking_uri(spec, run_dir)
    parent = nested_under.run_id if isinstance(nested_under, (Tracker, NullTracker)) else nested_under
    return Tracker(
        uri,
        spec.experiment,
        run_name=run_name,
        parent_run_id=parent or spec.parent_run_id,
        tags={**spec.tags, **(tags or {})},
        artifact_root=default_artifact_root(uri, run_dir),
        run_id=run_id,
    )

