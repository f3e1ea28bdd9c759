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
import re
import time
from typing import Any, Callable, Dict, FrozenSet, Iterable, Mapping, Optional, Tuple


def cache_root() -> str:
    """The per-user cache folder (``$HEYGEN_RAY_CACHE`` or ``~/.cache/heygen_ray``)."""
    return os.environ.get("HEYGEN_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "heygen_ray")


def read_cpuinfo(cpuinfo: str = "/proc/cpuinfo") -> Tuple[str, FrozenSet[str]]:
    """(CPU model name, feature flags) from Linux's /proc/cpuinfo (x86 "flags", Arm "Features");
    ("", empty) where the file does not exist."""
    model, flags = "", None
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags or frozenset()


def host_identity(cpuinfo: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """What a CPU measurement depends on besides its own inputs."""
    import platform

    import torch

    model, flags = read_cpuinfo(cpuinfo)
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16] if flags else ""
    return {"cpu": model or platform.processor() or platform.machine(), "flags": digest, "cores": os.cpu_count(),
            "torch": torch.__version__}


# The CPU features that decide how fast low-precision matmuls run: AMX tiles (bf16 and int8, several
# times the AVX-512 rate), AVX-512 bf16 dot products, VNNI int8 dot products, and the vector widths.
MATMUL_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimd",
                "bf16", "i8mm")


def short_cpu_name(model: str) -> str:
    """"Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz" -> "Intel Xeon Platinum 8481C"."""
    name = re.sub(r"\((R|TM|tm|r)\)", "", model or "")
    name = re.sub(r"\bCPU\b.*$|\bProcessor\b|\b\d+-Core\b", "", name)
    return " ".join(name.split())


def machine_kind(flags: Iterable[str], cores: Optional[int] = None, cpu: str = "") -> str:
    """A short name for the class of machine a benchmark ran on: cores, CPU, and what decides its
    low-precision speed, e.g. "2-core Intel Xeon, AMX (bf16, int8)" or "2-core AMD EPYC, AVX-512 bf16,
    no AMX" (benchmark goals such as "bf16 >= 2x" apply to one kind only, and two CPUs with the same
    flags can still differ: bf16 without AMX was 0.6x fp32 on one Xeon and 1.4x on an EPYC)."""
    f = set(flags)
    name = short_cpu_name(cpu)
    prefix = " ".join(p for p in (f"{cores}-core" if cores else "", name or "CPU") if p)
    if not f:
        return f"{prefix}, CPU flags unknown"
    if "amx_bf16" in f or "amx_tile" in f:
        kinds = [k for k, flag in (("bf16", "amx_bf16"), ("int8", "amx_int8")) if flag in f]
        return f"{prefix}, AMX ({', '.join(kinds) or 'tiles'})"
    if "avx512_bf16" in f:
        return f"{prefix}, AVX-512 bf16, no AMX"
    if "bf16" in f:  # Arm (Neoverse and later): BFMMLA
        return f"{prefix}, bf16 matmul instructions"
    return f"{prefix}, no hardware bf16" + (" (VNNI int8)" if {"avx512_vnni", "avx_vnni"} & f else "")


def machine_info(cpuinfo: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """What a benchmark result records about the machine: CPU model, cores, the matmul-relevant flags,
    the kind (:func:`machine_kind`), and the Python and torch versions."""
    import platform

    import torch

    model, flags = read_cpuinfo(cpuinfo)
    cores, cpu = os.cpu_count(), model or platform.processor() or platform.machine()
    return {"kind": machine_kind(flags, cores, cpu), "cpu": cpu, "cores": cores,
            "flags": [f for f in MATMUL_FLAGS if f in flags], "python": platform.python_version(), "torch": torch.__version__}


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
