"""benchmarks/summary.py: RESULTS.md from the results JSONs; files without a summary skipped with a note;
the shipped result files carry the summary their benchmark's summarize() derives."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_summary", REPO / "benchmarks" / "summary.py")
summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary)


def row(measure, met, goal=">= 2x", measured="2.5x", anchor="fp32"):
    return {"measure": measure, "anchor": anchor, "goal": goal, "measured": measured, "met": met}


def test_table_from_sample_results_with_a_file_lacking_a_summary(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "b_speed.json").write_text(json.dumps({"date": "2026-11-29T10:00:00+00:00", "machine": {
        "kind": "2-core Intel Xeon, AMX (bf16, int8)"}, "summary": [
        row("speed-up | bs1", True), row("speed-up bs8", False, measured="1.2x")]}))
    (results / "a_quality.json").write_text(json.dumps({"date": "2026-11-28T09:00:00", "summary": [
        row("accuracy", None, goal="none (measurement)", measured="0.91")]}))
    (results / "c_old.json").write_text(json.dumps({"date": "2026-01-01", "rate": 3.0}))
    (results / "d_broken.json").write_text("{not json")
    (results / "e_partial.json").write_text(json.dumps({"summary": [{"measure": "x", "goal": "y"}]}))
    out = tmp_path / "RESULTS.md"

    assert summary.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")]
    assert table == [
        "| a_quality | not recorded | accuracy | fp32 | none (measurement) | 0.91 | n/a | 2026-11-28 |",
        "| b_speed | 2-core Intel Xeon, AMX (bf16, int8) | speed-up \\| bs1 | fp32 | >= 2x | 2.5x | yes | 2026-11-29 |",
        "| b_speed | 2-core Intel Xeon, AMX (bf16, int8) | speed-up bs8 | fp32 | >= 2x | 1.2x | **no** | 2026-11-29 |",
    ]
    assert "1 of 2 goals met" in text
    assert "`c_old.json` skipped: no \"summary\"" in text
    assert "`d_broken.json` skipped: not readable JSON" in text
    assert "`e_partial.json` summary row 0 skipped: missing anchor, measured, met" in text


def test_backfill_adds_the_summary_from_the_benchmarks_summarize(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    shipped = json.loads((REPO / "benchmarks/results/data_pipeline.json").read_text())
    shipped.pop("summary", None)
    (results / "data_pipeline.json").write_text(json.dumps(shipped))
    (results / "no_script.json").write_text(json.dumps({"x": 1}))
    assert summary.backfill(results) == ["data_pipeline.json"]
    filled = json.loads((results / "data_pipeline.json").read_text())
    assert [r["met"] for r in filled["summary"]] == [shipped["ray_over_cores_x_single_steady"] >= 0.8,
                                                     shipped["ray_over_cores_x_single_whole_pass"] >= 0.8,
                                                     shipped["small_set_tasks_over_actor_pool"] >= 1,
                                                     shipped["large_set_actor_pool_over_tasks"] >= 1] + (
        [shipped["hd"]["ray_over_cores_x_single_whole_pass"] >= 0.8,
         shipped["hd"]["peak_rss_growth_mb_decoder_streaming"] < 0.25 * shipped["hd"]["file_mb"]] if "hd" in shipped else []) + (
        [shipped["trainer"]["data_wait_share_total"] <= 0.05] if "trainer" in shipped else [])
    assert "summary" not in json.loads((results / "no_script.json").read_text())
    assert summary.backfill(results) == []  # already there: left alone


@pytest.mark.parametrize("name", ["data_pipeline", "models", "training", "compression"])
def test_shipped_results_carry_the_summary_their_benchmark_derives(name):
    data = json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
    rows = summary.load_benchmark(name).summarize(data)
    assert rows and data["summary"] == rows
    assert all(set(r) == set(summary.FIELDS) and r["met"] in (True, False, None) for r in rows)


@pytest.mark.parametrize("data, kind", [
    ({"machine": {"kind": "2-core AMD EPYC, AVX-512 bf16, no AMX", "flags": []}}, "2-core AMD EPYC, AVX-512 bf16, no AMX"),
    # files written before the machine record: the kind from the flags each benchmark kept
    ({"cpu": "Intel(R) Xeon(R) Processor", "cpu_isa_flags": ["avx2", "avx512_bf16"], "cpu_count": 2},
     "2-core Intel Xeon, AVX-512 bf16, no AMX"),
    ({"machine": {"cpu": "x86_64", "cpus": 2, "flags": ["amx_bf16", "amx_int8", "avx512f"]}}, "2-core CPU, AMX (bf16, int8)"),
    ({"machine": {"cpus": 4, "cpu_flags": ["avx2"]}}, "4-core CPU, no hardware bf16"),
    ({"machine": {"cpus": 2, "amx": False, "avx512_bf16": True}}, "2-core CPU, AVX-512 bf16, no AMX"),
    ({"machine": {"cpus": 2, "amx": True, "avx512_bf16": True}}, "2-core CPU, AMX (bf16)"),
    ({"setup": {"machine": "x86_64"}}, "not recorded"),
])
def test_each_row_names_the_kind_of_machine_it_was_measured_on(data, kind):
    assert summary.machine_of(data) == kind


def test_every_benchmark_records_the_machine_record():
    """Each benchmark script writes heygen_ray.hostcache.machine_info() as its "machine" (so the next
    rerun of any of them shows its machine's kind in RESULTS.md)."""
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        if script.name != "summary.py":
            assert "machine_info()" in script.read_text(), script.name
