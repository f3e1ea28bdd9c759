"""A tracker that a tracking server going away does not stop: what a training worker logs through.

A training must not die because MLflow is unreachable for a while: its checkpoints are its state, the
MLflow run only mirrors it. :class:`ResilientTracker` wraps a :class:`~heygen_ray.tracking.runs.Tracker`:

* metrics are queued and sent in order; when a call fails, the queue is kept and no call is tried again
  for ``retry_after_s`` (so a down server costs the loop one failed request, not one per step), then the
  whole queue is sent first, so the curve arrives complete and in order once the server is back;
* any other call that fails (an artifact, a tag, a plot) is skipped and named in :meth:`not_logged`;
* :meth:`close` tries a last flush and returns what never reached the server, which the training puts
  in its results (and, when the server answers again, on the run as a tag).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

log = logging.getLogger(__name__)

# the calls that log something (everything else, such as run_id or client, is read from the wrapped tracker)
_LOGGING_CALLS = ("log_params", "set_tags", "log_artifact", "log_bytes", "log_text", "log_dict", "log_curve_plot",
                  "log_confusion_matrix", "log_scatter_plot")


class ResilientTracker:
    enabled = True

    def __init__(self, inner: Any, retry_after_s: float = 30.0) -> None:
        self.inner = inner
        self.retry_after_s = retry_after_s
        self._pending: List[Tuple[Dict[str, float], Optional[int]]] = []
        self._failed: List[str] = []
        self._down_until = 0.0
        self._last_error = ""

    def __getattr__(self, name: str) -> Any:
        if name in _LOGGING_CALLS:
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        return getattr(self.inner, name)

    # -- metrics: queued, sent in order -------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        self._pending.append(({k: float(v) for k, v in metrics.items()}, step))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send the queued metrics (unless the server failed less than ``retry_after_s`` ago and not
        ``force``); True when nothing is left."""
        if not force and time.monotonic() < self._down_until:
            return not self._pending
        while self._pending:
            metrics, step = self._pending[0]
            if not self._send("log_metrics", metrics, step):
                return False
            self._pending.pop(0)
        return True

    # -- everything else: tried once, skipped and named on failure -----------------------------------
    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() < self._down_until or not self._send(name, *args, **kwargs):
            what = next((a for a in args if isinstance(a, str)), "")
            self._failed.append(f"{name} {what}".strip())
            return None
        return self._result

    def _send(self, name: str, *args: Any, **kwargs: Any) -> bool:
        try:
            self._result = getattr(self.inner, name)(*args, **kwargs)
            return True
        except Exception as err:  # noqa: BLE001 - any failure of the tracking server: keep training
            if not self._last_error:
                log.warning("MLflow at %s unreachable (%s: %s); training goes on, metrics are queued and "
                            "retried every %.0f s", getattr(self.inner, "tracking_uri", "?"), type(err).__name__,
                            str(err)[:200], self.retry_after_s)
            self._last_error = f"{type(err).__name__}: {str(err)[:200]}"
            self._down_until = time.monotonic() + self.retry_after_s
            return False

    def record_failure(self, what: str, err: BaseException) -> None:
        """A call made on :attr:`inner` directly (the final model) that failed: named in :meth:`not_logged`."""
        self._failed.append(what)
        self._last_error = f"{type(err).__name__}: {str(err)[:200]}"
        log.warning("not logged to MLflow: %s (%s)", what, self._last_error)

    def not_logged(self) -> Dict[str, Any]:
        """What has not reached the server (empty when everything did)."""
        out: Dict[str, Any] = {}
        if self._pending:
            steps = [s for _, s in self._pending if s is not None]
            out["metric_points"] = sum(len(m) for m, _ in self._pending)
            out["steps"] = [min(steps), max(steps)] if steps else []
        if self._failed:
            out["calls"] = list(self._failed)
        if out:
            out["last_error"] = self._last_error
        return out

    def close(self) -> Dict[str, Any]:
        """A last flush (whatever the back-off); then what never reached the server, also set on the run
        as the tag ``heygen_ray.not_logged`` when the server answers."""
        self.flush(force=True)
        missing = self.not_logged()
        if missing:
            try:
                self.inner.set_tags({"heygen_ray.not_logged": str(missing)})
            except Exception:  # noqa: BLE001 - still down: the training's results carry it
                pass
        return missing
