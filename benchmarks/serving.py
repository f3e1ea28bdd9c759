"""Serving: requests/s with dynamic batching against without, and Serve's latency overhead.

    python benchmarks/serving.py [--requests 192] [--concurrency 32] [--out benchmarks/results/serving.json]

Setup: the video classifier the training config uses (conv_video_encoder_micro) on 8 x 112 x 112 clips
(a couple of optimizer steps: the weights do not matter for speed), logged and registered in a
sqlite MLflow store, served by the real app (`heygen_ray.serve.deploy`) on a local Ray: one
classify replica (0.25 CPU, so one torch thread), the ingress, the HTTP proxy. Requests upload a
real mp4 (raw ``video/mp4`` body) from the generated data set; each is decoded by PyAV in the
replica, exactly as in production.

1. Throughput at concurrency 32: the same app and replicas with ``max_batch_size=16`` (wait 20 ms)
   against ``max_batch_size=1`` (no batching), in rounds ordered batched, unbatched, unbatched,
   batched (each setting's requests/s is the mean of its two rounds). Goal >= 3x.
2. Latency at concurrency 1 (no batching deployed, so no batch wait): p50/p95/p99 of an HTTP
   request against an in-process call of the same code path (decode + preprocess + model) in this
   process with one torch thread, the two interleaved request by request. Goal: p50 overhead <= 5 ms.
The runs interleave nothing else of ours, but this is a shared 2-core machine: the load average is
recorded with the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Tuple

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

MODEL, OVERRIDES, CLIP = "conv_video_encoder_micro", {"image_size": 112}, (8, 112, 112)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _lat(xs: List[float]) -> Dict[str, float]:
    return {"p50_ms": round(_pct(xs, 50), 2), "p95_ms": round(_pct(xs, 95), 2), "p99_ms": round(_pct(xs, 99), 2),
            "mean_ms": round(statistics.fmean(xs), 2), "n": len(xs)}


def prepare(work: str) -> Dict[str, Any]:
    """Data set + a registered classifier in a sqlite store under ``work``."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from heygen_ray.config import SynthSpec
    from heygen_ray.data.decode import decode_clip
    from heygen_ray.data.synthetic import generate_dataset
    from heygen_ray.data.transforms import video_to_float
    from heygen_ray.models import create_model
    from heygen_ray.tracking import log_model, make_tracker, set_alias

    ds = generate_dataset(SynthSpec(output_dir=os.path.join(work, "data"), num_clips=16, frames=16, height=112, width=112, seed=1),
                          use_ray=False)
    rows = pq.read_table(ds.manifest).to_pylist()
    clips = [open(os.path.join(ds.output_dir, r["path"]), "rb").read() for r in rows]
    labels = json.load(open(ds.labels))["label_names"]
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=len(labels), **OVERRIDES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = video_to_float(torch.from_numpy(np.stack([decode_clip(c, *CLIP)[0] for c in clips[:4]])))
    y = torch.tensor([r["label"] for r in rows[:4]])
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(video=x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    uri = f"sqlite:///{os.path.join(work, 'mlflow.db')}"
    info = {"clip_frames": CLIP[0], "height": CLIP[1], "width": CLIP[2], "label_names": labels}
    with make_tracker({"tracking_uri": uri, "experiment": "bench-serving"}, work, run_name="bench") as t:
        logged = log_model(t, model, model_name=MODEL, model_overrides={"num_classes": len(labels), **OVERRIDES},
                           registered_model_name="bench-cls", extra={"task": "video_classification", "data_info": info})
    set_alias("bench-cls", "champion", logged.version, tracking_uri=uri)
    return {"tracking_uri": uri, "clips": clips, "model": model, "root": ds.output_dir}


def _spec(ctx: Dict[str, Any], port: int, max_batch_size: int):
    from heygen_ray.config import ServeSpec

    return ServeSpec.from_dict({
        "name": "bench", "host": "127.0.0.1", "port": port, "tracking_uri": ctx["tracking_uri"],
        "classify": {"model": "models:/bench-cls@champion", "num_cpus": 0.25, "max_ongoing_requests": 64,
                     "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.02 if max_batch_size > 1 else 0.0}},
        "limits": {"max_upload_bytes": 4 << 20},
    })


def _post(session, url: str, data: bytes) -> float:
    t0 = time.perf_counter()
    r = session.post(url, data=data, headers={"Content-Type": "video/mp4"}, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
    return (time.perf_counter() - t0) * 1000, int(r.headers["x-batch-size"])


def throughput(url: str, clips: List[bytes], n: int, concurrency: int) -> Dict[str, Any]:
    import threading

    import requests

    local = threading.local()

    def one(i):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return _post(local.s, url, clips[i % len(clips)])

    with ThreadPoolExecutor(concurrency) as pool:  # warm up every connection and the replica
        list(pool.map(one, range(concurrency)))
        t0 = time.perf_counter()
        res = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    lat = [r[0] for r in res]
    sizes = [r[1] for r in res]
    return {"requests": n, "concurrency": concurrency, "seconds": round(wall, 2), "rps": round(n / wall, 2),
            "latency": _lat(lat), "mean_batch_size": round(statistics.fmean(sizes), 2), "max_batch_size_seen": max(sizes)}


def latencies(url: str, model, clips: List[bytes], n: int) -> Tuple[List[float], List[float]]:
    """Concurrency 1, interleaved so both sides see the same machine load: one HTTP request, then
    the replica's code path in this process (decode with the same function and settings, float,
    model; one torch thread, as the replica has)."""
    import requests
    import torch

    from heygen_ray.data.decode import decode_clip
    from heygen_ray.serve.forward import classify_forward

    torch.set_num_threads(1)
    s = requests.Session()
    serve_ms, local_ms = [], []
    for i in range(n + 5):
        data = clips[i % len(clips)]
        a = _post(s, url, data)[0]
        t0 = time.perf_counter()
        clip, _ = decode_clip(data, *CLIP, sampling="uniform", short_clips="pad", resize="squash")
        classify_forward(model, [clip])
        b = (time.perf_counter() - t0) * 1000
        if i >= 5:
            serve_ms.append(a)
            local_ms.append(b)
    return serve_ms, local_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serving.json"))
    args = ap.parse_args()

    import ray

    from heygen_ray.serve import deploy, shutdown

    work = tempfile.mkdtemp(prefix="heygen_bench_serving_")
    ctx = prepare(work)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results: Dict[str, Any] = {}
    try:
        rounds: Dict[str, List[Dict[str, Any]]] = {"batched": [], "unbatched": []}
        # B, U, U, B: the machine is shared, so each setting gets an early and a late round
        for label in ("batched", "unbatched", "unbatched", "batched"):
            mbs = 16 if label == "batched" else 1
            spec = _spec(ctx, _free_port(), mbs)
            out = deploy(spec)
            url = out["url"] + "/v1/videos/classify"
            load0 = os.getloadavg()[0]
            r = throughput(url, ctx["clips"], args.requests, args.concurrency)
            r["batching"] = spec.classify.batching.to_dict()
            r["loadavg_1m"] = round((load0 + os.getloadavg()[0]) / 2, 1)
            rounds[label].append(r)
            if label == "unbatched" and "latency_serve" not in results:
                load0 = os.getloadavg()[0]
                serve_lat, local_lat = latencies(url, ctx["model"], ctx["clips"], args.latency_requests)
                results["latency_loadavg_1m"] = round((load0 + os.getloadavg()[0]) / 2, 1)
                results["latency_serve"] = _lat(serve_lat)
                results["latency_in_process"] = _lat(local_lat)
            shutdown()
        for label, rs in rounds.items():
            results[label] = {"rps": round(statistics.fmean(r["rps"] for r in rs), 2),
                              "mean_batch_size": round(statistics.fmean(r["mean_batch_size"] for r in rs), 2),
                              "rounds": rs}
    finally:
        try:
            shutdown()
        except Exception:
            pass
        ray.shutdown()
    speedup = results["batched"]["rps"] / results["unbatched"]["rps"]
    overhead = {k: round(results["latency_serve"][k] - results["latency_in_process"][k], 2) for k in ("p50_ms", "p95_ms", "p99_ms")}
    results["speedup_batched_vs_unbatched"] = round(speedup, 2)
    results["serve_overhead_ms"] = overhead
    results["setup"] = {"model": MODEL, "overrides": OVERRIDES, "clip": list(CLIP), "replicas": 1, "replica_num_cpus": 0.25}
    from heygen_ray.hostcache import machine_info

    results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["machine"] = machine_info()
    results["summary"] = [
        {"measure": "classify requests/s at concurrency 32, dynamic batching vs none (same model and replicas)",
         "anchor": f"no batching: {results['unbatched']['rps']} req/s", "goal": ">= 3x",
         "measured": f"{speedup:.2f}x ({results['batched']['rps']} vs {results['unbatched']['rps']} req/s, "
                     f"mean batch {results['batched']['mean_batch_size']})",
         "met": speedup >= 3.0},
        {"measure": "p50 latency of a Serve HTTP request vs an in-process call of the same model (concurrency 1)",
         "anchor": f"in-process p50 {results['latency_in_process']['p50_ms']} ms",
         "goal": "<= 5 ms overhead",
         "measured": (f"+{overhead['p50_ms']} ms p50 (serve p50/p95/p99 {results['latency_serve']['p50_ms']}/"
                      f"{results['latency_serve']['p95_ms']}/{results['latency_serve']['p99_ms']} ms; in-process "
                      f"{results['latency_in_process']['p50_ms']}/{results['latency_in_process']['p95_ms']}/"
                      f"{results['latency_in_process']['p99_ms']} ms)"),
         "met": overhead["p50_ms"] <= 5.0},
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for row in results["summary"]:
        print(f"{row['measure']}: {row['measured']} (goal {row['goal']}: {'met' if row['met'] else 'NOT met'})")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
