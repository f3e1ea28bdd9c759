"""Small measurements kept per host: what this machine measured once (the bf16 probe of a model, the
matmul peak) is read back by later runs instead of being measured again.

A measurement costs seconds at the start of every training run, and a repeated one on a busy machine can
land on either side of a threshold, so two runs of the same spec would train in different precisions. An
entry is keyed by what the value depends on (the caller's key, plus the CPU model, its flags, the core
count and the torch version) and lives in ``$HEYGEN_RAY_CACHE`` (default ``~/.cache/heygen_ray``), one
JSON file per entry; deleting the folder makes the next run measure afresh."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Mapping, Tuple


def cache_root() -> str:
    """The per-user cache folder (``$HEYGEN_RAY_CACHE`` or ``~/.cache/heygen_ray``)."""
    return os.environ.get("HEYGEN_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "heygen_ray")


def host_identity(cpuinfo: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """What a CPU measurement depends on besides its own inputs."""
    import platform

    import torch

    model, flags = "", ""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = hashlib.sha256(" ".join(sorted(value.split())).encode()).hexdigest()[:16]
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return {"cpu": model, "flags": flags, "cores": os.cpu_count(), "torch": torch.__version__}


def _entry_path(kind: str, key: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    full = {"kind": kind, **host_identity(), **key}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return os.path.join(cache_root(), "host", f"{kind}-{digest}.json"), full


def cached_measure(kind: str, key: Mapping[str, Any], measure: Callable[[], float]) -> Tuple[float, bool]:
    """``measure()`` once per host and ``key`` -> (value, whether it came from the cache).

    A failing ``measure`` raises and records nothing. The file appears atomically, so two workers
    measuring at once each write a whole entry and later runs read one of them."""
    path, full = _entry_path(kind, key)
    try:
        with open(path) as f:
            return float(json.load(f)["value"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = float(measure())
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"value": value, "measured_at": time.time(), "key": full}, f, default=str)
        os.replace(tmp, path)
    except OSError:  # a read-only home: measure every time, as without the cache
        pass
    return value, False
