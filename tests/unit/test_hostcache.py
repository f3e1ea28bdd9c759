"""Per-host measurements: measured once per key and host, read back after, keyed by what they depend on."""

from __future__ import annotations

import json
import os

import pytest

from heygen_ray.hostcache import cache_root, cached_measure, host_identity, machine_info, machine_kind, short_cpu_name


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEYGEN_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_measured_once_then_read_back_per_key(cache):
    calls = []

    def measure(v):
        return lambda: calls.append(v) or v

    assert cached_measure("peak", {"dtype": "fp32"}, measure(1.5)) == (1.5, False)
    assert cached_measure("peak", {"dtype": "fp32"}, measure(9.0)) == (1.5, True)  # not re-measured
    assert cached_measure("peak", {"dtype": "bf16"}, measure(3.0)) == (3.0, False)  # another key
    assert cached_measure("probe", {"dtype": "fp32"}, measure(4.0)) == (4.0, False)  # another kind
    assert calls == [1.5, 3.0, 4.0] and cache_root() == str(cache)
    entries = sorted(os.listdir(cache / "host"))
    assert len(entries) == 3 and not [e for e in entries if e.endswith(".tmp")]
    rec = json.loads((cache / "host" / entries[0]).read_text())
    assert rec["key"]["torch"] and rec["key"]["cores"] == os.cpu_count() and "measured_at" in rec


def test_a_failed_measure_records_nothing_and_a_corrupt_entry_is_measured_again(cache):
    def boom():
        raise RuntimeError("no bf16 kernel")

    with pytest.raises(RuntimeError):
        cached_measure("probe", {"m": 1}, boom)
    assert not (cache / "host").exists() or not os.listdir(cache / "host")
    cached_measure("probe", {"m": 1}, lambda: 2.0)
    (entry,) = (cache / "host").iterdir()
    entry.write_text("{not json")
    assert cached_measure("probe", {"m": 1}, lambda: 3.0) == (3.0, False)
    assert cached_measure("probe", {"m": 1}, lambda: 4.0) == (3.0, True)


def test_the_host_is_part_of_the_key(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("model name\t: CPU A\nflags\t\t: fpu avx2 amx_bf16\n")
    b.write_text("model name\t: CPU A\nflags\t\t: fpu avx2\n")
    ia, ib = host_identity(str(a)), host_identity(str(b))
    assert ia["cpu"] == ib["cpu"] == "CPU A" and ia["flags"] != ib["flags"]
    assert host_identity(str(tmp_path / "missing"))["cpu"]  # no /proc/cpuinfo: the platform's name


@pytest.mark.parametrize("flags, kind", [
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8", "2-core Intel Xeon Platinum 8481C, AMX (bf16, int8)"),
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", "2-core Intel Xeon Platinum 8481C, AVX-512 bf16, no AMX"),
    ("fpu avx2 avx_vnni", "2-core Intel Xeon Platinum 8481C, no hardware bf16 (VNNI int8)"),
    ("fpu avx2", "2-core Intel Xeon Platinum 8481C, no hardware bf16"),
])
def test_the_machine_record_names_what_decides_low_precision_speed(tmp_path, monkeypatch, flags, kind):
    info = tmp_path / "cpuinfo"
    info.write_text(f"model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t\t: {flags}\n")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    got = machine_info(str(info))
    assert got["kind"] == kind and got["cores"] == 2 and got["cpu"].startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert set(got["flags"]) <= set(flags.split()) and "fpu" not in got["flags"] and got["torch"] and got["python"]


def test_machine_kind_without_flags_or_a_model_name():
    assert machine_kind([], 2, "") == "2-core CPU, CPU flags unknown"
    assert machine_kind(["asimd", "bf16", "i8mm"], 4, "Neoverse-V1") == "4-core Neoverse-V1, bf16 matmul instructions"
    assert short_cpu_name("AMD EPYC 7B13 64-Core Processor") == "AMD EPYC 7B13"
