"""Model-zoo benchmark: training-step (forward + backward) throughput and FLOPs per sample, for
every family at its micro and base size, in fp32 and under CPU bf16 autocast.

    python benchmarks/models.py                      # everything -> benchmarks/results/models.json
    python benchmarks/models.py --families vit,swin --sizes micro --iters 20

Each measurement: build the preset (seeded), `example_inputs(batch)`, warm-up steps, then timed
steps of forward + backward (loss = mean square of the output; gradients cleared each step).
samples/s = batch x steps / wall time. `train_gflops_per_s` = 3 x forward FLOPs x samples/s
(the usual forward + 2x backward approximation). This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without an installed package

from heygen_ray.models import create_model  # noqa: E402

FAMILIES: Dict[str, Dict[str, str]] = {
    "vit": {"micro": "vit_micro", "base": "vit_b16"},
    "swin": {"micro": "swin_micro", "base": "swin_t"},
    "vit_video": {"micro": "vit_video_micro", "base": "vit_video_base"},
    "swin_video": {"micro": "swin_video_micro", "base": "swin_video_base"},
    "conv_video_encoder": {"micro": "conv_video_encoder_micro", "base": "conv_video_encoder_base"},
    "video_transformer": {"micro": "video_transformer_micro", "base": "video_transformer_base"},
    "temporal_transformer": {"micro": "temporal_transformer_micro", "base": "temporal_transformer_base"},
    "text_decoder": {"micro": "text_decoder_micro", "base": "text_decoder_base"},
    "text_processor": {"micro": "text_processor_micro", "base": "text_processor_base"},
    "multimodal_fusion": {"micro": "multimodal_fusion_micro", "base": "multimodal_fusion_base"},
    "video_generator": {"micro": "video_generator_micro", "base": "video_generator_base"},
}
# size reductions applied to base presets to fit the time budget on 2 cores (recorded in the JSON)
BASE_OVERRIDES: Dict[str, Dict[str, Any]] = {}


def train_steps(model: torch.nn.Module, inputs: Dict[str, torch.Tensor], steps: int, bf16: bool) -> float:
    """Run `steps` forward+backward steps; return the wall time in seconds."""
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**inputs)
        out.float().pow(2).mean().backward()
        for p in model.parameters():
            p.grad = None
    return time.perf_counter() - start


def measure(name: str, overrides: Dict[str, Any], batch: int, warmup: int, iters: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(name, **overrides).train()
    inputs = model.example_inputs(batch)
    flops = model.flops_per_sample()
    row: Dict[str, Any] = {
        "model": name,
        "overrides": overrides,
        "params": sum(p.numel() for p in model.parameters()),
        "fwd_flops_per_sample": flops,
        "batch_size": batch,
        "warmup_steps": warmup,
        "timed_steps": iters,
        "input_shapes": {k: list(v.shape) for k, v in inputs.items()},
    }
    for label, bf16 in (("fp32", False), ("bf16_autocast", True)):
        train_steps(model, inputs, warmup, bf16)
        seconds = train_steps(model, inputs, iters, bf16)
        rate = batch * iters / seconds
        row[label] = {
            "seconds_per_step": seconds / iters,
            "samples_per_s": rate,
            "train_gflops_per_s": 3 * flops * rate / 1e9,
        }
    row["bf16_over_fp32_speedup"] = row["bf16_autocast"]["samples_per_s"] / row["fp32"]["samples_per_s"]
    del model
    return row


def summarize(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The benchmark's rows for benchmarks/RESULTS.md (see benchmarks/summary.py), from its results dict.
    A measurement without a goal: one row per family at its largest measured size, bf16 autocast against fp32."""
    rows = []
    for family, sizes in report["results"].items():
        size = "base" if "base" in sizes else next(iter(sizes))
        r = sizes[size]
        rows.append({"measure": f"bf16 autocast training step (fwd+bwd), {r['model']}, batch {r['batch_size']}",
                     "anchor": f"fp32, same model ({r['fp32']['samples_per_s']:.3g} samples/s)",
                     "goal": "none (measurement)", "measured": f"{r['bf16_over_fp32_speedup']:.2f}x", "met": None})
    return rows


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="all", help=f"comma list or 'all' ({', '.join(FAMILIES)})")
    parser.add_argument("--sizes", default="micro,base", help="comma list of micro, base")
    parser.add_argument("--iters", type=int, default=10, help="timed steps at micro size")
    parser.add_argument("--base-iters", type=int, default=2, help="timed steps at base size")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--base-batch", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "models.json"))
    args = parser.parse_args(argv)

    families = list(FAMILIES) if args.families == "all" else args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    sizes = args.sizes.split(",")
    settings = {
        "micro": {"batch": args.micro_batch, "warmup": 2, "iters": args.iters},
        "base": {"batch": args.base_batch, "warmup": 1, "iters": args.base_iters},
    }
    from heygen_ray.hostcache import machine_info

    report: Dict[str, Any] = {
        "benchmark": "model zoo training step (forward + backward), fp32 vs bf16 autocast, CPU",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "settings": settings,
        "base_overrides": BASE_OVERRIDES,
        "notes": "train_gflops_per_s = 3 x fwd_flops_per_sample x samples_per_s; FLOPs count matmul/conv/"
                 "attention products only (2 per multiply-add), causal attention counted dense.",
        "results": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()
    for family in families:
        for size in sizes:
            name = FAMILIES[family][size]
            s = settings[size]
            overrides = BASE_OVERRIDES.get(name, {}) if size == "base" else {}
            t0 = time.perf_counter()
            row = measure(name, overrides, s["batch"], s["warmup"], s["iters"])
            report["results"].setdefault(family, {})[size] = row
            print(f"{family:22s} {size:5s} {name:28s} fwd {row['fwd_flops_per_sample'] / 1e9:9.3f} GFLOP/sample  "
                  f"fp32 {row['fp32']['samples_per_s']:9.2f}/s  bf16 {row['bf16_autocast']['samples_per_s']:9.2f}/s  "
                  f"x{row['bf16_over_fp32_speedup']:.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
            report["total_seconds"] = time.perf_counter() - total_start
            report["summary"] = summarize(report)
            out.write_text(json.dumps(report, indent=2) + "\n")  # written after every row
    print(f"wrote {out} in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
