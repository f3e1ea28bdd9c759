"""The report lists every variant with every figure; the quality gate withholds the alias."""

from heygen_ray.compress import report


def _rows():
    base = {"params": 10, "size_bytes": 100, "flops_per_sample": 1000, "p95_ms_bs1": 2.0, "p50_ms_bs8": 8.0,
            "p95_ms_bs8": 9.0, "throughput_bs8": 1000.0}
    return [
        dict(base, variant="teacher_fp32", metrics={"accuracy": 0.90}, p50_ms_bs1=10.0),
        dict(base, variant="teacher_bf16", metrics={"accuracy": 0.90}, p50_ms_bs1=8.0),
        dict(base, variant="pruned", metrics={"accuracy": 0.50}, p50_ms_bs1=2.0),  # fastest, far worse
        dict(base, variant="pruned_distilled", metrics={"accuracy": 0.895}, p50_ms_bs1=4.0),
        dict(base, variant="pruned_distilled_int8_static", metrics={"accuracy": 0.88}, p50_ms_bs1=3.0),
    ]


def test_gate_fails_variants_that_lose_too_much_and_alias_goes_to_the_fastest_passing_one():
    rows = _rows()
    report.apply_gate(rows, teacher="teacher_fp32", metric="accuracy", max_drop=0.01)
    gate = {r["variant"]: r["passes_gate"] for r in rows}
    assert gate == {"teacher_fp32": True, "teacher_bf16": True, "pruned": False, "pruned_distilled": True,
                    "pruned_distilled_int8_static": False}
    cands = ["pruned", "pruned_distilled", "pruned_distilled_int8_static"]
    assert report.pick_alias(rows, cands) == "pruned_distilled"  # not the faster ones that failed
    report.apply_gate(rows, teacher="teacher_fp32", metric="accuracy", max_drop=0.0)
    assert report.pick_alias(rows, cands) is None  # every candidate lost accuracy: nobody gets the alias
    report.apply_gate(rows, teacher="teacher_fp32", metric="accuracy", max_drop=0.05)
    assert report.pick_alias(rows, cands) == "pruned_distilled_int8_static"


def test_gate_for_a_lower_is_better_metric():
    rows = [{"variant": "t", "metrics": {"perplexity": 10.0}}, {"variant": "s", "metrics": {"perplexity": 10.5}}]
    report.apply_gate(rows, teacher="t", metric="perplexity", max_drop=0.4, mode="min")
    assert rows[1]["quality_delta"] == -0.5 and rows[1]["passes_gate"] is False


def test_table_and_plot_have_every_variant_and_figure():
    rows = _rows()
    report.apply_gate(rows, teacher="teacher_fp32", metric="accuracy", max_drop=0.01)
    report.add_speedups(rows, "teacher_fp32", "teacher_bf16")
    assert rows[2]["speedup_bs1_vs_fp32"] == 5.0 and rows[2]["speedup_bs1_vs_bf16"] == 4.0
    table = report.markdown_table(rows, "accuracy")
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    for line in lines[2:]:
        assert len(line.split("|")) == len(report.COLUMNS) + 2
        assert " - " not in line  # no missing figure
    svg = report.svg_scatter(rows, "accuracy")
    assert svg.startswith("<svg") and all(r["variant"] in svg for r in rows)


def test_without_a_bf16_teacher_the_bf16_speedups_are_missing_not_invented():
    rows = [r for r in _rows() if r["variant"] != "teacher_bf16"]
    report.add_speedups(rows, "teacher_fp32", None)
    final = rows[-1]
    assert final["speedup_bs1_vs_fp32"] == 10.0 / 3.0 and final["speedup_bs8_vs_fp32"] == 1.0
    assert final["speedup_bs1_vs_bf16"] is None and final["speedup_bs8_vs_bf16"] is None
    assert " - " in report.markdown_table(rows, "accuracy")  # shown as missing
