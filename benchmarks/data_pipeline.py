"""Clips/s of the Ray Data video pipeline against a plain single-process PyAV loop, same files, one run.

    python benchmarks/data_pipeline.py [--clips 256] [--frames 32] [--size 128] [--clip-frames 16] [--out-size 112]

Both sides decode with the same function (heygen_ray.data.decode.decode_clip, one decode thread), so
the ratio isolates what Ray Data adds: parallel decoder actors minus scheduling and transfer overhead.
Goal: ray_rate >= 0.8 x cores x single_process_rate. Results: benchmarks/results/data_pipeline.json.

Also, side by side: whole passes over a small split (``--small-clips``, a validation split's size) in
plain Ray tasks and in an actor pool, the two ways the pipeline decodes (``video.task_decode_max_rows``
picks tasks for small datasets); and the large set in tasks, for the other side of that choice.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def summarize(result: dict) -> list:
    """The benchmark's rows for benchmarks/RESULTS.md (see benchmarks/summary.py), from its results dict."""
    cores, single, goal = result["machine"]["cpus"], result["single_process_clips_per_s"], result["goal_ray_over_cores_x_single"]
    anchor = f"{cores} cores x single-process PyAV loop ({single} clips/s per core)"
    steady, whole = result["ray_over_cores_x_single_steady"], result["ray_over_cores_x_single_whole_pass"]
    return [
        {"measure": "Ray Data video pipeline clips/s, streaming once the decoders are up", "anchor": anchor,
         "goal": f">= {goal}x", "measured": f"{steady}x ({result['ray_pipeline_clips_per_s_steady_median']} clips/s)",
         "met": steady >= goal},
        {"measure": "Ray Data video pipeline clips/s, whole pass incl. decoder actor start-up", "anchor": anchor,
         "goal": f">= {goal}x", "measured": f"{whole}x (median of {len(result['ray_pipeline_clips_per_s_whole_pass'])} passes)",
         "met": whole >= goal},
        {"measure": "whole pass of a small split in plain tasks, vs in an actor pool (why small datasets use tasks)",
         "anchor": "the same split in an actor pool", "goal": ">= 1x",
         "measured": f"{result['small_set_tasks_over_actor_pool']}x", "met": result["small_set_tasks_over_actor_pool"] >= 1},
        {"measure": "whole pass of the large set in an actor pool, vs in plain tasks (why large datasets use actors)",
         "anchor": "the same set in plain tasks", "goal": ">= 1x",
         "measured": f"{result['large_set_actor_pool_over_tasks']}x", "met": result["large_set_actor_pool_over_tasks"] >= 1},
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=384)
    ap.add_argument("--frames", type=int, default=32, help="frames per source clip")
    ap.add_argument("--size", type=int, default=128, help="source clip height = width")
    ap.add_argument("--clip-frames", type=int, default=16, help="frames sampled per clip")
    ap.add_argument("--out-size", type=int, default=112, help="decoded height = width")
    ap.add_argument("--epochs", type=int, default=3, help="timed passes of the Ray pipeline (the first includes actor start-up)")
    ap.add_argument("--decode-batch-size", type=int, default=8)
    ap.add_argument("--small-clips", type=int, default=48, help="clips of the small split timed in tasks vs actors")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.json"))
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from heygen_ray import fsutil
    from heygen_ray.config import RaySpec, SynthSpec, VideoDataSpec
    from heygen_ray.data.decode import decode_clip
    from heygen_ray.data.synthetic import generate_dataset
    from heygen_ray.data.video import VideoPipeline
    from heygen_ray.runtime import init_ray

    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="hr-bench-data-")
    synth = SynthSpec(output_dir=work, num_clips=args.clips, frames=args.frames, height=args.size, width=args.size,
                      split={"train": 1.0, "val": 0.0, "test": 0.0})
    init_ray(RaySpec(num_cpus=cores))
    gen = generate_dataset(synth)
    paths = [fsutil.join(work, p) for p in pq.read_table(gen.manifest).column("path").to_pylist()]
    T, S = args.clip_frames, args.out_size

    # 1. plain single-process loop (warm the page cache and PyAV first)
    for p in paths[:8]:
        decode_clip(fsutil.read_bytes(p), T, S, S)
    t0 = time.perf_counter()
    for p in paths:
        decode_clip(fsutil.read_bytes(p), T, S, S, sampling="uniform", threads=1)
    single = len(paths) / (time.perf_counter() - t0)

    # 2. the Ray Data pipeline (uniform sampling, uint8 rows), consumed by the driver
    spec = VideoDataSpec(manifest=gen.manifest, clip_frames=T, height=S, width=S, sampling="uniform",
                         decode_batch_size=args.decode_batch_size)
    def whole_passes(pipe, rows: int) -> tuple:
        """clips/s of each timed pass: whole, and after the first batch."""
        passes, streams = [], []
        for _ in range(args.epochs):
            ds = pipe.dataset("train", columns=["video", "label"])
            t0 = time.perf_counter()
            n, first, n_first = 0, None, 0
            for b in ds.iter_batches(batch_size=args.decode_batch_size, batch_format="numpy"):
                if first is None:
                    first, n_first = time.perf_counter(), len(b["video"])
                n += len(b["video"])
            t1 = time.perf_counter()
            assert n == rows, (n, rows)
            passes.append(n / (t1 - t0))  # whole pass: includes starting the decoders
            streams.append((n - n_first) / max(t1 - first, 1e-9))  # once they are up
        return passes, streams

    def median(xs: list) -> float:
        return sorted(xs)[len(xs) // 2]

    pipe = VideoPipeline.from_spec(spec)  # 384 clips > task_decode_max_rows: the actor pool
    assert len(paths) > spec.task_decode_max_rows
    passes, streams = whole_passes(pipe, len(paths))
    large_tasks, _ = whole_passes(VideoPipeline.from_spec(spec.model_copy(update={"task_decode_max_rows": len(paths)})),
                                  len(paths))
    small_dir = tempfile.mkdtemp(prefix="hr-bench-data-small-")
    small = generate_dataset(synth.model_copy(update={"output_dir": small_dir, "num_clips": args.small_clips}))
    small_spec = spec.model_copy(update={"manifest": small.manifest})
    small_tasks, _ = whole_passes(VideoPipeline.from_spec(small_spec), args.small_clips)
    small_actors, _ = whole_passes(VideoPipeline.from_spec(small_spec.model_copy(update={"task_decode_max_rows": 0})),
                                   args.small_clips)
    steady = sorted(streams)[len(streams) // 2]  # median
    whole = sorted(passes)[len(passes) // 2]
    ratio = steady / (cores * single)
    result = {
        "benchmark": "data_pipeline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": cores, "python": platform.python_version(), "ray": ray.__version__},
        "workload": {"clips": len(paths), "source": f"{args.frames}x{args.size}x{args.size} H.264 mp4",
                     "decoded": f"{T}x{S}x{S}x3 uint8", "mean_file_bytes": gen.total_bytes // len(paths),
                     "decode_batch_size": args.decode_batch_size},
        "single_process_clips_per_s": round(single, 1),
        "ray_pipeline_clips_per_s_whole_pass": [round(x, 1) for x in passes],
        "ray_pipeline_clips_per_s_after_first_batch": [round(x, 1) for x in streams],
        "ray_pipeline_clips_per_s_steady_median": round(steady, 1),
        "ray_over_single_steady": round(steady / single, 2),
        "ray_over_cores_x_single_steady": round(ratio, 2),
        "ray_over_cores_x_single_whole_pass": round(whole / (cores * single), 2),
        "goal_ray_over_cores_x_single": 0.8,
        "whole_pass_clips_per_s_median": {
            f"{len(paths)} clips, actor pool (the pipeline's choice)": round(median(passes), 1),
            f"{len(paths)} clips, tasks": round(median(large_tasks), 1),
            f"{args.small_clips} clips, tasks (the pipeline's choice)": round(median(small_tasks), 1),
            f"{args.small_clips} clips, actor pool": round(median(small_actors), 1),
        },
        "small_set_tasks_over_actor_pool": round(median(small_tasks) / median(small_actors), 2),
        "large_set_actor_pool_over_tasks": round(median(passes) / median(large_tasks), 2),
        "note": "a whole pass includes starting the decoder actors (about 2 s here; Ray Data starts a new "
                "actor pool every time a dataset is executed, i.e. every epoch); 'after first batch' is the "
                "streaming rate once they are up",
    }
    result["summary"] = summarize(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
