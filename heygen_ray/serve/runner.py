"""Deploy the Serve app on the current Ray, smoke-test it over HTTP, shut it down.

Used by `jobs/serve.py`, `heygen-ray serve ...` and the pipeline job (through `heygen_ray.serve`).
The smoke test speaks plain HTTP with the standard library, as any client would.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, List, Optional, Tuple

from heygen_ray.config import ServeSpec

log = logging.getLogger(__name__)

SMOKE_PROMPT = "a red circle moves left"


def _url(spec: ServeSpec) -> str:
    host = "127.0.0.1" if spec.host in ("0.0.0.0", "::", "") else spec.host
    prefix = spec.route_prefix.rstrip("/")
    return f"http://{host}:{spec.port}{prefix}"


def deploy(spec: ServeSpec, *, blocking: bool = False) -> Dict[str, Any]:
    """Start Serve on the spec's host/port, on the Ray this process joined (``runtime.init_ray(spec.ray)``
    first), and deploy the app; returns {"url", "endpoints": {name: {"path", "model", "variants"}}, "app"}. With
    ``blocking=True`` it then serves until interrupted (Ctrl-C shuts the app down)."""
    from ray import serve

    from heygen_ray.runtime import require_ray
    from heygen_ray.serve.app import ROUTES, app_from_spec

    require_ray("serve.deploy")
    serve.start(http_options={"host": spec.host, "port": spec.port})
    running = _http_binding()
    if running is not None and running != (spec.host, spec.port):  # Serve was already up elsewhere
        log.warning("Serve already runs on %s:%s; the app is served there, not on %s:%s (serve.shutdown() "
                    "first to move it)", *running, spec.host, spec.port)
        spec = ServeSpec.from_dict(dict(spec.to_dict(), host=running[0], port=running[1]))
    serve.run(app_from_spec(spec), name=spec.name, route_prefix=spec.route_prefix, blocking=False,
              logging_config={"enable_access_log": spec.access_log})
    url = _url(spec)
    result = {
        "url": url, "app": spec.name,
        "endpoints": {e: {"path": ROUTES[e], "url": url + ROUTES[e], "model": getattr(spec, e).model,
                          "variants": sorted(getattr(spec, e).variants)} for e in spec.enabled()},
    }
    log.info("serving %s at %s", spec.name, url)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            shutdown()
    return result


def _http_binding() -> Optional[Tuple[str, int]]:
    """(host, port) of the running Serve HTTP proxies (through Serve's client; None if unknown)."""
    try:
        from ray.serve.context import _get_global_client

        cfg = _get_global_client().http_config
        return str(cfg.host), int(cfg.port)
    except Exception:  # pragma: no cover - private API moved
        return None


def shutdown() -> None:
    """Tear down every Serve app and Serve itself on the current Ray (the HTTP port is freed)."""
    from ray import serve

    serve.shutdown()


# --------------------------------------------------------------------------------------------------
# Smoke test
# --------------------------------------------------------------------------------------------------


def sample_video(frames: int = 8, size: int = 32, fps: int = 8) -> bytes:
    """A small H.264 mp4 (a red square moving left on grey), made here: no file needed."""
    import numpy as np

    from heygen_ray.data.media import encode_mp4

    clip = np.full((frames, size, size, 3), 96, dtype=np.uint8)
    side = max(4, size // 4)
    for t in range(frames):
        x = max(0, size - side - t * (size - side) // max(frames - 1, 1))
        clip[t, size // 2 - side // 2: size // 2 + side // 2, x: x + side] = (220, 40, 40)
    return encode_mp4(clip, fps)


def multipart(fields: Dict[str, Tuple[Optional[str], str, bytes]]) -> Tuple[bytes, str]:
    """{name: (filename or None, content type, bytes)} -> (body, content-type header)."""
    boundary = uuid.uuid4().hex
    parts: List[bytes] = []
    for name, (filename, ctype, data) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def http(method: str, url: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
         headers: Optional[Dict[str, str]] = None, timeout: float = 120.0) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers (lower-case), body) of one request; HTTP errors are returned, not raised."""
    h = dict(headers or {})
    if content_type:
        h["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def smoke(url: str, spec: ServeSpec, *, timeout: float = 120.0) -> Dict[str, Any]:
    """One request per enabled endpoint (plus /healthz and /v1/models); returns per endpoint
    {"status", "latency_ms", "model", "version", "variant"}; raises RuntimeError naming every failure."""
    video = sample_video() if {"classify", "match"} & set(spec.enabled()) else b""
    calls = {
        "healthz": ("GET", "/healthz", None, None),
        "models": ("GET", "/v1/models", None, None),
        "classify": ("POST", "/v1/videos/classify", *multipart({"video": ("clip.mp4", "video/mp4", video)})),
        "generate": ("POST", "/v1/videos/generate", json.dumps({"prompt": SMOKE_PROMPT, "seed": 0}).encode(), "application/json"),
        "complete": ("POST", "/v1/text/complete", json.dumps({"prompt": "a red", "max_tokens": 8}).encode(), "application/json"),
        "match": ("POST", "/v1/match", *multipart({"video": ("clip.mp4", "video/mp4", video),
                                                  "captions": (None, "application/json",
                                                               json.dumps([SMOKE_PROMPT, "a blue square moves up"]).encode())})),
    }
    results: Dict[str, Any] = {}
    failures = []
    base = url.rstrip("/")
    for name in ["healthz", "models", *spec.enabled()]:
        method, path, body, ctype = calls[name]
        t0 = time.perf_counter()
        try:
            status, headers, data = http(method, base + path, body, ctype, timeout=timeout)
        except Exception as err:  # connection refused, timeout
            status, headers, data = 0, {}, f"{type(err).__name__}: {err}".encode()
        ms = (time.perf_counter() - t0) * 1000
        results[name] = {"status": status, "latency_ms": round(ms, 2), "model": headers.get("x-model-name"),
                         "version": headers.get("x-model-version"), "variant": headers.get("x-model-variant"),
                         "bytes": len(data)}
        if status != 200:
            failures.append(f"{method} {path} -> {status}: {data[:300].decode('utf-8', 'replace')}")
        elif name == "generate" and headers.get("content-type") != "video/mp4":
            failures.append(f"{path}: expected video/mp4, got {headers.get('content-type')}")
    if failures:
        raise RuntimeError("serve smoke test failed:\n  " + "\n  ".join(failures))
    return results
