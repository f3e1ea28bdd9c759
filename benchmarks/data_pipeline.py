"""Clips/s of the Ray Data video pipeline against a plain single-process PyAV loop, same files, one run.

    python benchmarks/data_pipeline.py [--clips 256] [--frames 32] [--size 128] [--clip-frames 16] [--out-size 112]

Both sides decode with the same function (heygen_ray.data.decode.decode_clip, one decode thread), so
the ratio isolates what Ray Data adds: parallel decoder actors minus scheduling and transfer overhead.
Goal: ray_rate >= 0.8 x cores x single_process_rate. Results: benchmarks/results/data_pipeline.json.

Also, side by side: whole passes over a small split (``--small-clips``, a validation split's size) in
plain Ray tasks and in an actor pool, the two ways the pipeline decodes (``video.task_decode_max_rows``
picks tasks for small datasets); and the large set in tasks, for the other side of that choice.

And real-sized video (``--hd-minutes``, 0 skips it): one generated 1280x720 H.264 file of 10 minutes,
a manifest of time windows over it (``--hd-windows`` rows of 2 s, evenly spread), decoded by seeking
to each window: the single-process rate, the Ray Data whole-pass rate (start-up included) and their
ratio against cores x single; and the peak RSS of one decoder process reading the file as a stream
(what the pipeline does) against reading it whole into memory first (what it did before).

And the trainer's side (``--trainer-steps``, 0 skips it): the quickstart's classifier
(configs/train/video_classification.yaml on the quickstart's data set, 2 workers) trained on Ray
Train; its data-wait share over the whole run (the seconds its steps waited for a batch, start-up
included, over its training time). Goal: <= 5 %.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# One decoder process: its RSS after the imports, then the clips; prints the peak RSS growth (MB) over
# that baseline and the clips/s. "bytes" reads each file whole first (what the pipeline did before).
# (VmHWM of /proc/self/status: getrusage's ru_maxrss keeps the parent's peak across fork + exec.)
HD_SCRIPT = r"""
import sys, time
from heygen_ray.data.decode import decode_clip
def peak_mb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024.0
path, mode, windows = sys.argv[1], sys.argv[2], [tuple(map(float, w.split(":"))) for w in sys.argv[3].split(",")]
decode_clip(path, 16, 112, 112, sampling="uniform", start_s=0.0, end_s=2.0)  # PyAV loaded and warm
base = peak_mb()
t0 = time.perf_counter()
for a, b in windows:
    src = open(path, "rb").read() if mode == "bytes" else path
    decode_clip(src, 16, 112, 112, sampling="uniform", start_s=a, end_s=b)
    del src
dt = time.perf_counter() - t0
print(peak_mb() - base, len(windows) / dt)
"""


def write_long_video(path: str, minutes: float, fps: int, width: int = 1280, height: int = 720) -> float:
    """A `minutes`-long H.264 mp4 at 4 Mbit/s (a camera-like size: ~300 MB for 10 minutes), a keyframe
    every 2 s, written straight to `path` (never held in memory): moving grain over a gradient, with
    bars and a square that move. Returns the seconds it took."""
    import av
    import numpy as np

    t0 = time.perf_counter()
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) * 127 // (width + height))], -1).astype(np.int16)
    grain = np.random.default_rng(0).integers(-24, 24, size=(4, height, width, 3), dtype=np.int16)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.codec_context.thread_count = 0
        stream.bit_rate = 4_000_000
        stream.options = {"preset": "ultrafast", "x264-params": "vbv-maxrate=4000:vbv-bufsize=8000"}
        for t in range(int(minutes * 60 * fps)):
            frame = np.clip(base + np.roll(grain[t % 4], (5 * t) % width, axis=1), 0, 255).astype(np.uint8)
            x, y = (37 * t) % (width - 160), (23 * t) % (height - 160)
            frame[y:y + 160, x:x + 160] = (255 - t % 256, t % 256, 128)
            frame[:, (11 * t) % width] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return time.perf_counter() - t0


def hd_case(args, cores: int, work: str) -> dict:
    """The real-sized video measurements (see the module docstring)."""
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    from heygen_ray.config import VideoDataSpec
    from heygen_ray.data.video import VideoPipeline

    path = os.path.join(work, "long_720p.mp4")
    encode_s = write_long_video(path, args.hd_minutes, args.hd_fps)
    length = args.hd_minutes * 60
    starts = [round(i * (length - 2.0) / max(args.hd_windows - 1, 1), 3) for i in range(args.hd_windows)]
    windows = [(a, a + 2.0) for a in starts]
    pq.write_table(pa.table({"path": ["long_720p.mp4"] * len(windows), "start": [a for a, _ in windows],
                             "end": [b for _, b in windows]}), os.path.join(work, "hd.parquet"))

    def child(mode: str) -> tuple:  # (peak RSS MB, clips/s) of one decoder process
        arg = ",".join(f"{a}:{b}" for a, b in windows)
        out = subprocess.run([sys.executable, "-c", HD_SCRIPT, path, mode, arg], capture_output=True, text=True, check=True)
        rss, rate = out.stdout.split()
        return float(rss), float(rate)

    child("stream")  # warm the page cache
    rss_stream, single = child("stream")
    rss_bytes, single_bytes = child("bytes")
    spec = VideoDataSpec(manifest=os.path.join(work, "hd.parquet"), clip_frames=16, height=112, width=112,
                         sampling="uniform")
    passes = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        n = sum(len(b["video"]) for b in VideoPipeline.from_spec(spec).dataset(columns=["video"]).iter_batches(
            batch_size=8, batch_format="numpy"))
        passes.append(n / (time.perf_counter() - t0))
        assert n == len(windows), (n, len(windows))
    whole = sorted(passes)[len(passes) // 2]
    return {
        "source": f"1280x720 H.264 at 4 Mbit/s, {args.hd_minutes:g} min at {args.hd_fps} fps (keyframe every 2 s), "
                  f"{os.path.getsize(path) / 2**20:.1f} MB, encoded in {encode_s:.0f} s",
        "windows": f"{len(windows)} windows of 2 s -> 16 frames of 112x112",
        "file_mb": round(os.path.getsize(path) / 2**20, 1),
        "single_process_clips_per_s": round(single, 2),
        "single_process_clips_per_s_whole_file_in_memory": round(single_bytes, 2),
        "peak_rss_growth_mb_decoder_streaming": round(rss_stream, 1),
        "peak_rss_growth_mb_decoder_whole_file_in_memory": round(rss_bytes, 1),
        "ray_pipeline_clips_per_s_whole_pass": [round(x, 2) for x in passes],
        "ray_over_cores_x_single_whole_pass": round(whole / (cores * single), 2),
    }


def trainer_case(args, work: str) -> dict:
    """The quickstart classifier's data-wait share (see the module docstring)."""
    import ray
    import yaml

    from heygen_ray.config import RaySpec, TrainSpec, load_spec
    from heygen_ray.runtime import init_ray
    from heygen_ray.train.driver import run_training

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    quickstart = yaml.safe_load(open(os.path.join(repo, "configs/pipeline/quickstart.yaml")))["data"]
    synth = {**quickstart["synth"], "output_dir": os.path.join(work, "data")}
    spec = load_spec(TrainSpec, os.path.join(repo, "configs/train/video_classification.yaml"), [
        # the pipeline's data set, the training config's own video settings (as the pipeline runs it)
        f"data.synth={json.dumps(synth)}", f"steps={args.trainer_steps}",
        f"run_dir={work}/runs", "tracking.enabled=false"])
    init_ray(RaySpec(num_cpus=os.cpu_count() or 1))  # a Ray of its own, as a training job has
    try:
        out = run_training(spec).to_dict()
    finally:
        ray.shutdown()
    m = out["metrics"]
    return {"config": "configs/train/video_classification.yaml on the quickstart's data set",
            "steps": out["step"], "workers": spec.scaling.num_workers, "seconds": out["seconds"],
            "data_wait_share_total": round(m["data_wait_share_total"], 4),
            "data_wait_share_last_window": round(m["data_wait_share"], 4), "val_ema_accuracy": m.get("val_ema_accuracy")}


def summarize(result: dict) -> list:
    """The benchmark's rows for benchmarks/RESULTS.md (see benchmarks/summary.py), from its results dict."""
    cores, single, goal = result["machine"]["cpus"], result["single_process_clips_per_s"], result["goal_ray_over_cores_x_single"]
    anchor = f"{cores} cores x single-process PyAV loop ({single} clips/s per core)"
    steady, whole = result["ray_over_cores_x_single_steady"], result["ray_over_cores_x_single_whole_pass"]
    rows = [
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
    hd = result.get("hd")
    if hd:
        rows += [
            {"measure": "1280x720 H.264 windows (seek + decode), Ray Data whole pass incl. start-up",
             "anchor": f"{cores} cores x single-process PyAV ({hd['single_process_clips_per_s']} clips/s per core)",
             "goal": f">= {goal}x", "measured": f"{hd['ray_over_cores_x_single_whole_pass']}x",
             "met": hd["ray_over_cores_x_single_whole_pass"] >= goal},
            {"measure": f"peak RSS growth of one decoder over a {hd['file_mb']} MB 720p file, read as a stream",
             "anchor": f"reading it whole first: +{hd['peak_rss_growth_mb_decoder_whole_file_in_memory']} MB",
             "goal": "well below the file's size (bounded whatever its length)",
             "measured": f"+{hd['peak_rss_growth_mb_decoder_streaming']} MB",
             "met": hd["peak_rss_growth_mb_decoder_streaming"] < 0.25 * hd["file_mb"]},
        ]
    tr = result.get("trainer")
    if tr:
        rows.append({"measure": f"data-wait share of the quickstart classifier's training ({tr['workers']} workers, "
                                f"{tr['steps']} steps, start-up included)", "anchor": "its training time",
                     "goal": "<= 5 %", "measured": f"{100 * tr['data_wait_share_total']:.1f} %",
                     "met": tr["data_wait_share_total"] <= 0.05})
    return rows


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
    ap.add_argument("--hd-minutes", type=float, default=10.0, help="length of the 1280x720 file (0: skip that case)")
    ap.add_argument("--hd-fps", type=int, default=24)
    ap.add_argument("--hd-windows", type=int, default=192, help="2 s windows over the 720p file")
    ap.add_argument("--trainer-steps", type=int, default=300, help="quickstart classifier steps (0: skip that case)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.json"))
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from heygen_ray import fsutil
    from heygen_ray.config import RaySpec, SynthSpec, VideoDataSpec
    from heygen_ray.data.decode import decode_clip
    from heygen_ray.data.synthetic import generate_dataset
    from heygen_ray.data.video import VideoPipeline
    from heygen_ray.hostcache import machine_info
    from heygen_ray.runtime import init_ray

    cores = os.cpu_count() or 1
    # first, on a Ray of its own, as a training job has one (not after the other cases in their Ray)
    trainer = trainer_case(args, tempfile.mkdtemp(prefix="hr-bench-trainer-")) if args.trainer_steps > 0 else None
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
        "machine": {**machine_info(), "ray": ray.__version__},
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
    if args.hd_minutes > 0:
        result["hd"] = hd_case(args, cores, tempfile.mkdtemp(prefix="hr-bench-hd-"))
    if trainer is not None:
        result["trainer"] = trainer
    result["summary"] = summarize(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
