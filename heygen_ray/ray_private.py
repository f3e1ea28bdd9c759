"""The only module that touches Ray's private APIs, each wrapped in one small function.

Ray 2.x has no public API for these needs:

- a small cluster-wide key-value store: the sweep's "stop this trial" flags and the pipeline's
  per-unit step counts are a few bytes written by one process (a Train controller, a trial) and read
  by another (the driver) while both run. ``ray.experimental.internal_kv`` is the store Ray's own
  libraries use for this; the public alternative, a named actor, would hold a CPU-less process per
  run and fail when the cluster's object store is full;
- the dashboard URL and the session log folder of the cluster this process joined (``ray.init``
  returns the URL only to the process that started the cluster).

Every function here degrades instead of raising where the caller only reports (URL, log folder).
"""

from __future__ import annotations

from typing import Optional

NAMESPACE = "heygen_ray"


def kv_put(key: str, value: bytes) -> None:
    """Set ``key`` (overwriting) in the cluster's key-value store, namespace ``heygen_ray``."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key.encode(), value, overwrite=True, namespace=NAMESPACE)


def kv_get(key: str) -> Optional[bytes]:
    """The value of ``key``, or None when it is not set."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key.encode(), namespace=NAMESPACE)


def kv_exists(key: str) -> bool:
    from ray.experimental import internal_kv

    return bool(internal_kv._internal_kv_exists(key.encode(), namespace=NAMESPACE))


def kv_delete(key: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key.encode(), namespace=NAMESPACE)


def dashboard_url() -> Optional[str]:
    """The Ray dashboard of the cluster this process joined, as an http URL (None when unknown)."""
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # noqa: BLE001
        return None
    return f"http://{url}" if url and not url.startswith("http") else url or None


def logs_dir() -> Optional[str]:
    """This node's Ray session log folder (every worker's stdout/stderr), None when unknown."""
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001
        return None
