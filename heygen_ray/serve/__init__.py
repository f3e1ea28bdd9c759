"""Ray Serve deployment of the registered models (see `app.py` for the application).

    from heygen_ray.serve import deploy, smoke, shutdown
    out = deploy(spec)                 # {"url": "http://127.0.0.1:8000", "endpoints": {...}}
    smoke(out["url"], spec)            # one request per endpoint; raises on failure
    shutdown()

Importing this package imports neither ray nor torch; the functions do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:  # pragma: no cover
    from heygen_ray.config import ServeSpec


def deploy(spec: "ServeSpec", *, blocking: bool = False) -> Dict[str, Any]:
    """Deploy the app on the current Ray (Serve on the spec's host/port); returns {"url", "endpoints"}."""
    from heygen_ray.serve.runner import deploy as _deploy

    return _deploy(spec, blocking=blocking)


def smoke(url: str, spec: "ServeSpec") -> Dict[str, Any]:
    """One request per enabled endpoint; per-endpoint status and latency; raises RuntimeError on failure."""
    from heygen_ray.serve.runner import smoke as _smoke

    return _smoke(url, spec)


def shutdown() -> None:
    """Shut Serve down on the current Ray."""
    from heygen_ray.serve.runner import shutdown as _shutdown

    _shutdown()


__all__ = ["deploy", "smoke", "shutdown"]
