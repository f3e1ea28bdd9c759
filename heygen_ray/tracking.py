"""MLflow at the edge: runs, metrics, artifacts, and model versions (the only module that imports mlflow).

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

A logged model is an MLflow *pyfunc* model ("models from code", `heygen_ray/_mlflow_pyfunc.py`):
`artifacts/model.safetensors` (weights) + `artifacts/model.json` (registry name, overrides, input
names, ...), so `mlflow.pyfunc.load_model(uri).predict({...numpy...})` works and `load_model(uri)`
returns the original class, for every model of the zoo, without per-architecture code and without
unpickling anything.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
from xml.sax.saxutils import escape

from heygen_ray.config import TrackingSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

MODEL_FORMAT = "heygen_ray.model/1"  # model.json "format": bump when the layout changes
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
_PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mlflow_pyfunc.py")

# MLflow limits (mlflow/utils/validation.py: MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH,
# MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"

# Inputs whose dimension 1 is a sequence length (the batch contract in heygen_ray/models/__init__.py):
# in a logged model's signature that dimension is variable (-1), like the batch dimension.
_SEQUENCE_INPUTS = frozenset(
    {"input_ids", "attention_mask", "memory", "memory_mask", "text_embeddings", "video_embeddings", "video_mask"}
)
# Input examples larger than this (elements, batch of 1) are not stored with the model (the JSON
# would be huge); the signature is still inferred from them.
MAX_EXAMPLE_ELEMENTS = 100_000

RunStatus = str  # "FINISHED" | "FAILED" | "KILLED"


# --------------------------------------------------------------------------------------------------
# URIs and experiments
# --------------------------------------------------------------------------------------------------


def _client(tracking_uri: Optional[str] = None):
    """An MlflowClient whose registry is the tracking backend itself (not a global registry URI)."""
    from mlflow import MlflowClient

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
# Plots without new dependencies: PNG through matplotlib's object API when it is importable
# (no pyplot, no global backend switch), else a hand-drawn SVG (the MLflow UI shows both).
# --------------------------------------------------------------------------------------------------

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _image_format(file: str, image_format: str) -> str:
    ext = os.path.splitext(file)[1].lower().lstrip(".")
    fmt = image_format if image_format != "auto" else (ext if ext in ("png", "svg") else "auto")
    if fmt == "png" and not _have_matplotlib():
        fmt = "svg"
    if fmt == "auto":
        fmt = "png" if _have_matplotlib() else "svg"
    if fmt not in ("png", "svg"):
        raise ValueError(f"image_format must be 'auto', 'png' or 'svg', got {image_format!r}")
    return fmt


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _clean_series(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    pts = [(float(s), float(v)) for s, v in points]
    return sorted((s, v) for s, v in pts if math.isfinite(s) and math.isfinite(v))


def svg_curves(history: Mapping[str, Sequence[Tuple[float, float]]], width: int = 640, panel_height: int = 170) -> str:
    """One small line chart per metric, stacked (metrics keep their own y scale)."""
    left, right, top, bottom = 64, 16, 24, 26
    names = list(history)
    height = max(1, len(names)) * panel_height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for i, name in enumerate(names):
        pts = _clean_series(history[name])
        y0 = i * panel_height
        pw, ph = width - left - right, panel_height - top - bottom
        last = f" (last {_fmt(pts[-1][1])})" if pts else " (no finite values)"
        parts.append(f'<text x="{left}" y="{y0 + 15}" font-weight="bold">{escape(name)}{escape(last)}</text>')
        parts.append(
            f'<rect x="{left}" y="{y0 + top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
        )
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1.0
        if ymax == ymin:
            pad = abs(ymin) * 0.05 or 0.5
            ymin, ymax = ymin - pad, ymax + pad

        def sx(x: float) -> float:
            return left + (x - xmin) / (xmax - xmin) * pw

        def sy(y: float) -> float:
            return y0 + top + (1.0 - (y - ymin) / (ymax - ymin)) * ph

        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(xs[0]):.1f}" cy="{sy(ys[0]):.1f}" r="3" fill="{color}"/>')
        else:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        parts.append(f'<text x="{left - 4}" y="{y0 + top + 4}" text-anchor="end">{_fmt(ymax)}</text>')
        parts.append(f'<text x="{left - 4}" y="{y0 + top + ph}" text-anchor="end">{_fmt(ymin)}</text>')
        parts.append(f'<text x="{left}" y="{y0 + top + ph + 14}">{_fmt(xmin)}</text>')
        parts.append(f'<text x="{left + pw}" y="{y0 + top + ph + 14}" text-anchor="end">step {_fmt(max(xs))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str = "confusion matrix") -> str:
    """Confusion-matrix heat map: rows = true class, columns = predicted; shade = row fraction."""
    n = len(labels)
    cell = max(6, min(40, 560 // max(n, 1)))
    margin = 16 + 7 * max((min(len(str(l)), 18) for l in labels), default=1)
    top = margin + 24
    width, height = margin + n * cell + 16, top + n * cell + 16
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="4" y="14" font-weight="bold">{escape(title)} (rows: true, columns: predicted)</text>',
    ]
    for r in range(n):
        total = float(sum(matrix[r])) or 1.0
        y = top + r * cell
        parts.append(f'<text x="{margin - 4}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{escape(str(labels[r])[:18])}</text>')
        for c in range(n):
            frac = float(matrix[r][c]) / total
            shade = int(round(255 * (1.0 - frac)))
            x = margin + c * cell
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({shade},{shade},255)" stroke="#ddd">'
                f"<title>{escape(str(labels[r]))} -> {escape(str(labels[c]))}: {_fmt(float(matrix[r][c]))}</title></rect>"
            )
            if n <= 20 and cell >= 18:
                ink = "white" if frac > 0.5 else "black"
                parts.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" fill="{ink}">'
                    f"{_fmt(float(matrix[r][c]))}</text>"
                )
    for c in range(n):
        x = margin + c * cell + cell / 2 + 4
        parts.append(
            f'<text x="{x:.1f}" y="{top - 4}" transform="rotate(-90 {x:.1f} {top - 4})">{escape(str(labels[c])[:18])}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _png_curves(history: Mapping[str, Sequence[Tuple[float, float]]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(history) or ["(empty)"]
    fig = Figure(figsize=(6.4, 1.8 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(len(names), 1, i + 1)
        pts = _clean_series(history.get(name, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_COLORS[i % len(_COLORS)], marker="." if len(pts) == 1 else None)
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _png_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str]) -> bytes:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=float)
    frac = m / np.clip(m.sum(axis=1, keepdims=True), 1e-12, None)
    n = len(labels)
    size = min(12.0, 2.0 + 0.45 * n)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), [str(l) for l in labels], rotation=90, fontsize=8)
    ax.set_yticks(range(n), [str(l) for l in labels], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for r in range(n):
            for c in range(n):
                ax.text(c, r, _fmt(m[r, c]), ha="center", va="center", fontsize=7, color="white" if frac[r, c] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
        labels = [str(l) for l in label_names] if label_names is not None else [str(i) for i in range(n)]
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


def _matrix_rows(matrix: Any) -> List[List[float]]:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu()
    if hasattr(matrix, "tolist"):
        matrix = matrix.tolist()
    return [[float(v) for v in row] for row in matrix]


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


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


# --------------------------------------------------------------------------------------------------
# Models: safetensors + JSON inside an MLflow pyfunc ("models from code"); no pickle anywhere
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedModel:
    """What `log_model` returns. `version` is the registry version as a string ("1", "2", ...;
    MLflow's registry APIs accept it as is) or None when not registered; `model_uri` is the
    MLflow 3 logged-model URI `models:/m-<id>`."""

    model_uri: str
    registered_name: Optional[str]
    version: Optional[str]
    run_id: str
    model_id: str

    @property
    def registry_uri(self) -> Optional[str]:
        """`models:/<name>/<version>` when registered."""
        return f"models:/{self.registered_name}/{self.version}" if self.registered_name else None


class ModelRef(NamedTuple):
    """A registry reference resolved: (name, version, run_id, source)."""

    name: Optional[str]
    version: Optional[str]
    run_id: Optional[str]
    source: str


def _pip_requirements() -> List[str]:
    """Exact versions of what the pyfunc wrapper imports (no inference: fast, offline; torch's
    local "+cpu" suffix is dropped, as pip indexes do not carry it)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "safetensors", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:  # pragma: no cover
            reqs.append(dist)
    return reqs


def _to_numpy(t: "torch.Tensor"):
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _example_numpy(inputs: Mapping[str, Any]) -> Dict[str, Any]:
    """Batch-1 numpy copies of tensor inputs (None entries dropped)."""
    import numpy as np
    import torch

    out = {}
    for k, v in inputs.items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            out[k] = _to_numpy(v[:1])
        else:
            out[k] = np.asarray(v)[:1]
    return out


def _signature(example: Mapping[str, Any], output: Any, sequence_axes: bool):
    """Tensor signature: batch dim variable; dim 1 of sequence inputs (and of a >=3-d output of a
    model that takes them) variable too."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    specs = []
    for name, arr in example.items():
        shape = [-1, *arr.shape[1:]]
        if name in _SEQUENCE_INPUTS and len(shape) >= 2:
            shape[1] = -1
        specs.append(TensorSpec(arr.dtype, tuple(shape), name))
    out_shape = [-1, *output.shape[1:]]
    if sequence_axes and len(out_shape) >= 3:
        out_shape[1] = -1
    return ModelSignature(inputs=Schema(specs), outputs=Schema([TensorSpec(output.dtype, tuple(out_shape))]))


def _float_dtype(module: "nn.Module") -> Optional[str]:
    for p in module.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return None


def log_model(
    tracker: Union[Tracker, NullTracker],
    model: "nn.Module",
    *,
    model_name: str,
    model_overrides: Optional[Mapping[str, Any]] = None,
    registered_model_name: Optional[str] = None,
    input_example: Optional[Mapping[str, "torch.Tensor"]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    name: str = "model",
    step: int = 0,
    version_tags: Optional[Mapping[str, str]] = None,
    await_registration_s: int = 300,
) -> Optional[LoggedModel]:
    """Log `model` (a zoo model, or DDP/compiled wrapper of one) to the tracker's run as a pyfunc
    model, and register it as a new version of `registered_model_name` when given.

    `model_name`/`model_overrides` must rebuild the architecture: `create_model(model_name,
    **model_overrides)`; a head resized with `reset_classifier` is recorded (num_classes) and
    redone on load. `input_example` (default: `model.example_inputs(1)`) gives the signature; it is
    stored (batch 1) unless larger than MAX_EXAMPLE_ELEMENTS. `extra` (JSON-able: label names,
    tokenizer path, precision, variant, lineage...) lands in model.json. Weights are saved from any
    device; the model's train/eval mode is left as it was. Returns None on a NullTracker.
    """
    if not isinstance(tracker, Tracker):
        return None
    import mlflow.pyfunc
    import safetensors.torch
    import torch
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    import heygen_ray
    from heygen_ray.models import unwrap_model

    m = unwrap_model(model)
    overrides = dict(model_overrides or {})
    config = {
        "format": MODEL_FORMAT,
        "registry_name": model_name,
        "overrides": overrides,
        "class": type(m).__name__,
        "input_names": list(m.input_names),
        "num_classes": int(m.num_classes),
        "num_features": int(getattr(m, "num_features", 0) or 0),
        "dtype": _float_dtype(m),
        "heygen_ray_version": heygen_ray.__version__,
        "torch_version": torch.__version__,
        "extra": dict(extra or {}),
    }
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"log_model: model_overrides and extra must be JSON-serialisable ({e})") from None

    inputs = dict(input_example) if input_example is not None else m.example_inputs(1)
    example = _example_numpy(inputs)
    unknown = sorted(set(example) - set(m.input_names))
    if unknown:
        raise ValueError(f"log_model: input_example has {unknown}, which {type(m).__name__} does not take "
                         f"(inputs: {list(m.input_names)})")
    was_training = m.training
    m.eval()
    try:
        output = _predict_numpy(m, example)
    finally:
        m.train(was_training)
    signature = _signature(example, output, sequence_axes=any(k in _SEQUENCE_INPUTS for k in example))
    stored_example = example if sum(a.size for a in example.values()) <= MAX_EXAMPLE_ELEMENTS else None

    client = tracker.client
    run_id = tracker._rid()
    lm = client.create_logged_model(
        experiment_id=tracker.experiment_id,
        name=name,
        source_run_id=run_id,
        params=flatten({"registry_name": model_name, "overrides": overrides}),
        tags={"heygen_ray.model_format": MODEL_FORMAT},
        model_type="heygen_ray",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="heygen_ray_model_") as tmp:
            files = os.path.join(tmp, "files")
            os.makedirs(files)
            weights = os.path.join(files, WEIGHTS_FILE)
            safetensors.torch.save_model(m, weights, metadata={"format": "pt"})  # dedups tied weights
            cfg_path = os.path.join(files, CONFIG_FILE)
            with open(cfg_path, "w") as f:
                f.write(config_text)
            local = os.path.join(tmp, "model")
            mlflow_model = Model(artifact_path=lm.artifact_location, run_id=run_id, model_uuid=lm.model_id,
                                 model_id=lm.model_id)
            mlflow.pyfunc.save_model(
                path=local,
                python_model=_PYFUNC_CODE,
                artifacts={"weights": weights, "config": cfg_path},
                signature=signature,
                input_example=stored_example,
                pip_requirements=_pip_requirements(),
                metadata={"heygen_ray": {k: config[k] for k in ("format", "registry_name", "class", "num_classes")}},
                mlflow_model=mlflow_model,
            )
            client.log_model_artifacts(lm.model_id, local)
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=step)])
        client.finalize_logged_model(lm.model_id, "READY")
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(lm.model_id, "FAILED")
        raise

    model_uri = f"models:/{lm.model_id}"
    version = None
    if registered_model_name:
        try:
            client.create_registered_model(registered_model_name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # A tracking server resolves a `models:/m-<id>` source itself. A local SQL registry looks
        # the logged model up through a *global* MlflowClient() (TODO in mlflow/store/model_registry/
        # sqlalchemy_store.py create_model_version), i.e. the wrong store unless the process-wide
        # URI happens to match: there, register the storage location directly (the version's
        # `heygen_ray.model_id` tag keeps the link to the logged model).
        remote = tracker.tracking_uri.split(":", 1)[0].lower() in ("http", "https")
        mv = client.create_model_version(
            registered_model_name, source=model_uri if remote else lm.artifact_location, run_id=run_id,
            model_id=lm.model_id, tags={"heygen_ray.model_id": lm.model_id, **dict(version_tags or {})},
            await_creation_for=await_registration_s,
        )
        version = str(mv.version)
    return LoggedModel(model_uri, registered_model_name, version, run_id, lm.model_id)


def set_alias(name: str, alias: str, version: Union[str, int], *, tracking_uri: Optional[str] = None) -> None:
    """Point `models:/<name>@<alias>` at `version` (moves the alias if it exists)."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


def resolve_model_uri(uri: str, *, tracking_uri: Optional[str] = None) -> ModelRef:
    """`models:/name@alias`, `models:/name/<version>` or `models:/m-<id>` -> ModelRef(name, version,
    run_id, source). A logged model that is not registered gives name = version = None."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise ValueError(f"not a models:/ URI: {uri!r} (expected models:/<name>@<alias>, "
                         "models:/<name>/<version> or models:/<model_id>)")
    client = _client(tracking_uri)
    name, alias, version = match.group("name", "alias", "version")
    if alias is not None:
        mv = client.get_model_version_by_alias(name, alias)
    elif version is not None:
        mv = client.get_model_version(name, version)
    else:
        lm = client.get_logged_model(name)
        return ModelRef(None, None, lm.source_run_id, uri)
    return ModelRef(mv.name, str(mv.version), mv.run_id, mv.source)


def _load_from_files(config_path: str, weights_path: str, map_location: Union[str, "torch.device"] = "cpu"):
    """(model in eval mode, config) from a model.json + model.safetensors pair. No pickle: the
    architecture comes from the registry, the tensors from safetensors."""
    import torch
    from safetensors import safe_open

    from heygen_ray.models import create_model

    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{config_path}: unsupported model format {config.get('format')!r} (expected {MODEL_FORMAT})")
    model = create_model(config["registry_name"], **config.get("overrides", {}))
    if int(config.get("num_classes", model.num_classes)) != model.num_classes:
        model.reset_classifier(int(config["num_classes"]))
    if config.get("dtype"):
        dtype = getattr(torch, str(config["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{config_path}: unknown dtype {config['dtype']!r}")
        model.to(dtype)
    with safe_open(weights_path, framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        aliases = f.metadata() or {}
    # safetensors.torch.save_model stores a tied/shared tensor once and records
    # {dropped name: kept name} in the metadata: restore the dropped names from the kept tensor.
    for dropped, kept in aliases.items():
        if dropped not in state and kept in state:
            state[dropped] = state[kept]
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model, config


def _predict_numpy(model: "nn.Module", model_input: Any):
    """Run `model` on a dict of numpy arrays (or one array for a single-input model) -> numpy."""
    import numpy as np
    import torch

    names = list(model.input_names)
    if not isinstance(model_input, Mapping):
        if hasattr(model_input, "to_dict") and not isinstance(model_input, np.ndarray):  # a DataFrame
            raise TypeError("pass a dict of numpy arrays keyed by input name (tensor signature)")
        model_input = {names[0]: model_input}
    unknown = sorted(set(model_input) - set(names))
    if unknown:
        raise ValueError(f"unknown inputs {unknown}; the model takes {names}")
    device = next(model.parameters()).device
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = {}
    for k, v in model_input.items():
        t = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        tensors[k] = t.to(float_dtype) if t.is_floating_point() else t
    with torch.inference_mode():
        return _to_numpy(model(**tensors))


def _storage_uri(uri: str, tracking_uri: Optional[str]) -> str:
    """Where the files of a `models:/` URI live, looked up through our client. (MLflow's own
    `models:/` artifact repository resolves names through the *global* registry URI and ignores
    the `tracking_uri`/`registry_uri` given to `download_artifacts`: models_artifact_repo.py
    `_get_model_uri_infos`.)"""
    match = _MODELS_URI.match(uri)
    if not match:
        return uri
    client = _client(tracking_uri)
    name, alias, version = match.group("name", "alias", "version")
    if alias is None and version is None:
        return client.get_logged_model(name).artifact_location
    if alias is not None:
        version = client.get_model_version_by_alias(name, alias).version
    return client.get_model_version_download_uri(name, str(version))


def _download_model_dir(uri: str, tracking_uri: Optional[str], dst: str) -> str:
    """A local directory holding the pyfunc model of `uri` (downloaded into `dst` if remote)."""
    if os.path.isdir(uri):
        return uri
    source = _storage_uri(uri, tracking_uri)
    local = source[len("file://"):] if source.startswith("file://") else source
    if "://" not in local and os.path.isdir(local):
        return local
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri)


def load_model_and_config(
    uri: str, map_location: Union[str, "torch.device"] = "cpu", *, tracking_uri: Optional[str] = None
) -> Tuple["nn.Module", Dict[str, Any]]:
    """(model, model.json dict) from `models:/name@alias`, `models:/name/<version>`,
    `models:/m-<id>`, an artifact URI of the model directory, or a local model directory."""
    with tempfile.TemporaryDirectory(prefix="heygen_ray_load_") as tmp:
        root = _download_model_dir(uri, tracking_uri, tmp)
        config_path = os.path.join(root, "artifacts", CONFIG_FILE)
        weights_path = os.path.join(root, "artifacts", WEIGHTS_FILE)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise FileNotFoundError(f"{uri} is not a heygen_ray model (no artifacts/{CONFIG_FILE} + {WEIGHTS_FILE})")
        return _load_from_files(config_path, weights_path, map_location)


def load_model(uri: str, map_location: Union[str, "torch.device"] = "cpu", *, tracking_uri: Optional[str] = None) -> "nn.Module":
    """The logged model as its own class (eval mode), rebuilt by name and loaded from safetensors."""
    return load_model_and_config(uri, map_location, tracking_uri=tracking_uri)[0]


def load_pyfunc(uri: str, *, tracking_uri: Optional[str] = None):
    """`mlflow.pyfunc.load_model` for `uri` resolved through `tracking_uri` (not the global URI):
    `.predict({input_name: numpy array})` -> numpy array."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="heygen_ray_pyfunc_") as tmp:
        # load_context reads the weights into memory, so the download can go afterwards
        return mlflow.pyfunc.load_model(_download_model_dir(uri, tracking_uri, tmp))


__all__ = [
    "LoggedModel",
    "TrackingSpec",
    "ModelRef",
    "NullTracker",
    "Tracker",
    "default_artifact_root",
    "ensure_experiment",
    "flatten",
    "load_model",
    "load_model_and_config",
    "load_pyfunc",
    "log_model",
    "make_tracker",
    "resolve_model_uri",
    "resolve_spec",
    "resolve_tracking_uri",
    "set_alias",
    "svg_curves",
    "svg_heatmap",
]
