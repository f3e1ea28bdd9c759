"""Compression benchmark: the quickstart video classifier through the whole compression stage, every
variant measured side by side in one process (latencies interleaved round by round); results in
benchmarks/results/compression.json.

    python benchmarks/compression.py [--config configs/compress/video_classifier.yaml] [k=v ...]

Goals (issue 7): the final variant's batch-1 latency >= 4x faster than the fp32 teacher and >= 1.5x
faster than the teacher's bf16 cast, with at most 1 point of accuracy lost. The JSON records what was
reached at batch 1 and batch 8, and the same figures for every variant, so the limit is visible.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def summarize(out: dict) -> list:
    """The benchmark's rows for benchmarks/RESULTS.md (see benchmarks/summary.py), from its results dict."""
    goals, reached, variants = out["goals"], out["reached"], out["variants"]
    fp32, bf16, final = variants["teacher_fp32"], variants["teacher_bf16"], out["final_variant"]
    fastest = reached["fastest_student_variant"]
    clip_points = 100 / out["eval_rows"]  # one test clip, in accuracy points
    delta = reached["final_accuracy_delta"] * 100
    breakdown = [
        {"measure": f"where one batch-1 call goes, {name}: compute operators (conv/matmul) / other operators / "
                    "outside operators (glue, or a compiled graph's fused kernels)",
         "anchor": f"its profiled time ({b['profiled_ms']:.2f} ms; unprofiled {b['wall_ms']:.2f} ms)",
         "goal": "none (measurement)",
         "measured": f"{b['compute_share']:.0%} / {b['other_ops_share']:.0%} / {b['outside_ops_share']:.0%}, "
                     f"{b['op_calls_per_forward']:g} operator calls",
         "met": None}
        for name, b in ((n, variants[n].get("batch1_breakdown")) for n in ("teacher_fp32", final)) if b]

    def speedup(bs: int, who: str, key: str, anchor: str) -> dict:
        """The row for ``reached[key]`` (a batch-``bs`` speed-up of ``who``) against teacher ``anchor``."""
        ref, goal = (fp32, goals["speedup_vs_fp32"]) if anchor == "fp32" else (bf16, goals["speedup_vs_bf16"])
        return {"measure": f"batch-{bs} p50 latency speed-up, {who}",
                "anchor": f"teacher {anchor} ({ref[f'p50_ms_bs{bs}']:.2f} ms)", "goal": f">= {goal:g}x",
                "measured": f"{reached[key]:.2f}x", "met": reached[key] >= goal}

    return [
        *(speedup(bs, f"final variant ({final})", f"final_speedup_bs{bs}_vs_{anchor}", anchor)
          for bs in (1, 8) for anchor in ("fp32", "bf16")),
        speedup(1, f"fastest student ({fastest})", "fastest_speedup_bs1_vs_fp32", "fp32"),
        {"measure": f"{out['metric']} change, final variant", "anchor": f"teacher fp32 ({fp32['quality']:.3f})",
         "goal": f"<= {goals['max_accuracy_drop'] * 100:g} point drop",
         "measured": f"{delta:+.1f} points ({out['eval_rows']} test clips: 1 clip = {clip_points:.1f} points)",
         # a goal finer than one test clip cannot be judged on this split
         "met": (delta >= -goals["max_accuracy_drop"] * 100) if clip_points <= goals["max_accuracy_drop"] * 100 else None},
    ] + breakdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs/compress/video_classifier.yaml"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "compression.json"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from heygen_ray.compress.stage import run_compression
    from heygen_ray.config import CompressSpec, RaySpec, load_spec
    from heygen_ray.runtime import init_ray

    work = tempfile.mkdtemp(prefix="heygen_compress_bench_")
    spec = load_spec(CompressSpec, args.config, [f"run_dir={work}/runs", "tracking.enabled=false",
                                                 "measure.rounds=7", "measure.iters=10", "measure.breakdown=true", *args.overrides])
    init_ray(RaySpec(num_cpus=4))
    load_before = os.getloadavg()
    res = run_compression(spec).to_dict()
    load_after = os.getloadavg()
    rows = {r["variant"]: r for r in res["variants"]}
    final = rows[res["final_variant"]]
    fastest = min((r for r in res["variants"] if not r["variant"].startswith("teacher")), key=lambda r: r["p50_ms_bs1"])
    keep = ("quality", "quality_delta", "params", "size_bytes", "flops_per_sample", "p50_ms_bs1", "p95_ms_bs1",
            "p50_ms_bs8", "p95_ms_bs8", "throughput_bs8", "speedup_bs1_vs_fp32", "speedup_bs1_vs_bf16",
            "speedup_bs8_vs_fp32", "speedup_bs8_vs_bf16", "passes_gate", "batch1_breakdown")
    from heygen_ray.hostcache import machine_info

    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": load_after},
        "config": os.path.relpath(args.config, REPO), "overrides": args.overrides, "model": res["model"],
        "metric": res["metric"], "eval_rows": res["eval_rows"], "prune": {k: v for k, v in res["prune"].items()},
        "final_variant": res["final_variant"],
        "goals": {"speedup_vs_fp32": 4.0, "speedup_vs_bf16": 1.5, "max_accuracy_drop": 0.01},
        "reached": {
            "final_speedup_bs1_vs_fp32": final["speedup_bs1_vs_fp32"], "final_speedup_bs1_vs_bf16": final["speedup_bs1_vs_bf16"],
            "final_speedup_bs8_vs_fp32": final["speedup_bs8_vs_fp32"], "final_speedup_bs8_vs_bf16": final["speedup_bs8_vs_bf16"],
            "final_accuracy_delta": final["quality_delta"],
            "fastest_student_variant": fastest["variant"], "fastest_speedup_bs1_vs_fp32": fastest["speedup_bs1_vs_fp32"],
        },
        "variants": {name: {k: r.get(k) for k in keep} | {"metrics": r["metrics"]} for name, r in rows.items()},
        "int8_vs_fp32_student": res["int8_vs_fp32_student"],
        "seconds": res["seconds"],
    }
    out["summary"] = summarize(out)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out["reached"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
