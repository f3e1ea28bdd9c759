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
    (results / "b_speed.json").write_text(json.dumps({"date": "2026-11-29T10:00:00+00:00", "summary": [
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
        "| a_quality | accuracy | fp32 | none (measurement) | 0.91 | n/a | 2026-11-28 |",
        "| b_speed | speed-up \\| bs1 | fp32 | >= 2x | 2.5x | yes | 2026-11-29 |",
        "| b_speed | speed-up bs8 | fp32 | >= 2x | 1.2x | **no** | 2026-11-29 |",
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
