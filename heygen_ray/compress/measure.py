"""Measuring a model variant: task quality on a held-out split, size, FLOPs, latency, throughput.

Every variant is measured by the same functions, in the same process, on the same batches:

- quality: the task's own metrics (``Task.new_metrics/update_metrics/compute_metrics``) over the
  held-out batches; batches are padded to one fixed size so compiled variants never recompile;
- parameters: element count of the model's tensors (quantized tensors count their elements once);
- size on disk: the byte size of the variant's saved artifact;
- FLOPs: ``ModelBase.flops_per_sample`` of the architecture (a quantized or bf16 variant does the
  same operations at lower precision, so it reports its architecture's FLOPs);
- latency: p50/p95 of single forward calls at batch 1 and batch 8, with the variants *interleaved*
  round by round (the machine is shared, so a slow spell hits every variant alike);
- throughput: samples/s at batch 8 from the p50.

Pure PyTorch: no ray, no mlflow.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

Runnable = Callable[..., torch.Tensor]  # called as fn(**inputs) -> outputs


def count_params(model: nn.Module) -> int:
    """Parameter elements (a quantized weight counts its logical elements once, like its fp32 twin)."""
    return sum(p.numel() for p in model.parameters())


def file_size(path: str) -> int:
    """Bytes of a file, or of every file under a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def _pad(inputs: Mapping[str, torch.Tensor], size: int) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in inputs.items():
        n = v.shape[0]
        out[k] = v if n == size else torch.cat([v, v[-1:].expand(size - n, *v.shape[1:])], dim=0)
    return out


@torch.inference_mode()
def evaluate(fn: Runnable, batches: Sequence[Mapping[str, torch.Tensor]], task: Any, info: Any,
             batch_size: int = 8) -> Dict[str, float]:
    """The task's metrics of ``fn`` over ``batches`` (raw batches from the data pipeline), each
    padded to ``batch_size`` rows for the forward pass and cut back before scoring."""
    state = task.new_metrics(info)
    for batch in batches:
        inputs, targets = task.inputs(dict(batch))
        n = targets.shape[0]
        for start in range(0, n, batch_size):
            part = {k: v[start:start + batch_size] for k, v in inputs.items()}
            m = min(batch_size, n - start)
            out = fn(**_pad(part, batch_size))[:m]
            task.update_metrics(state, out.float(), targets[start:start + m])
    return task.compute_metrics(state)


def agreement(fn_a: Runnable, fn_b: Runnable, inputs_list: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, float]:
    """How close two variants' outputs are: max |a - b| relative to max |a|, and top-1 agreement."""
    rel, agree, n = 0.0, 0, 0
    with torch.inference_mode():
        for inputs in inputs_list:
            a, b = fn_a(**inputs).float(), fn_b(**inputs).float()
            rel = max(rel, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            n += a.shape[0]
    return {"max_rel_error": rel, "top1_agreement": agree / max(n, 1)}


def latencies(variants: Mapping[str, Runnable], inputs: Mapping[int, Mapping[str, torch.Tensor]], *,
              rounds: int = 5, iters: int = 10, warmup: int = 3) -> Dict[str, Dict[str, float]]:
    """Interleaved timing: for each round, each batch size, each variant, ``iters`` timed calls.
    Returns {variant: {"p50_ms_bs1", "p95_ms_bs1", "p50_ms_bs8", ..., "throughput_bs8"}} for the batch
    sizes in ``inputs`` ({batch size: keyword inputs})."""
    samples: Dict[str, Dict[int, List[float]]] = {v: {b: [] for b in inputs} for v in variants}
    with torch.inference_mode():
        for name, fn in variants.items():  # warm-up: compiles, caches, allocator
            for b, x in inputs.items():
                for _ in range(warmup):
                    fn(**x)
        for _ in range(rounds):
            for b, x in inputs.items():
                for name, fn in variants.items():
                    fn(**x)  # one untimed call after switching variants (caches, thread pools)
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        fn(**x)
                        samples[name][b].append(time.perf_counter() - t0)
    out: Dict[str, Dict[str, float]] = {}
    for name, per_bs in samples.items():
        row: Dict[str, float] = {}
        for b, ts in per_bs.items():
            ts = sorted(ts)
            p50 = statistics.median(ts) * 1e3
            p95 = ts[min(len(ts) - 1, int(round(0.95 * (len(ts) - 1))))] * 1e3
            row[f"p50_ms_bs{b}"], row[f"p95_ms_bs{b}"] = p50, p95
            row[f"throughput_bs{b}"] = b / (p50 / 1e3)
        out[name] = row
    return out


# Operators that hold the arithmetic (matmuls and convolutions, float or int8); every other operator
# (reshapes, copies, elementwise, quantize/dequantize) is overhead at batch 1.
COMPUTE_OPS = ("conv", "linear", "addmm", "mm", "bmm", "matmul", "qconv", "qlinear", "scaled_dot_product", "_int_mm")


def time_breakdown(fn: Runnable, inputs: Mapping[str, torch.Tensor], *, iters: int = 20, warmup: int = 3,
                   top: int = 5) -> Dict[str, Any]:
    """Where one call's time goes (torch.profiler, CPU): the share in compute operators (COMPUTE_OPS),
    in every other operator, and outside any operator (Python and dispatch glue, or the fused kernels
    of a compiled graph, which the profiler does not split), plus operator calls per forward and the
    ``top`` operators by time. ``wall_ms`` is timed without the profiler; the shares are of the
    profiled time (``profiled_ms``, which the profiler itself inflates)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(warmup):
            fn(**inputs)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(**inputs)
        wall = (time.perf_counter() - t0) / iters * 1e3
        with profile(activities=[ProfilerActivity.CPU]):  # the profiler's first session is slow: a throwaway one
            fn(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn(**inputs)
    compute = ops = glue = 0.0
    calls = 0
    per_op: List[tuple] = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / iters
        if "::" not in e.key:  # a range (the compiled graph, a module), not an operator
            glue += ms
            continue
        calls += e.count
        per_op.append((e.key, ms, e.count / iters))
        if any(k in e.key.split("::", 1)[1] for k in COMPUTE_OPS):
            compute += ms
        else:
            ops += ms
    total = compute + ops + glue
    share = (lambda x: round(x / total, 3)) if total > 0 else (lambda x: 0.0)
    per_op.sort(key=lambda r: -r[1])
    return {"wall_ms": round(wall, 4), "profiled_ms": round(total, 4), "compute_share": share(compute),
            "other_ops_share": share(ops), "outside_ops_share": share(glue),
            "op_calls_per_forward": round(calls / iters, 1),
            "top_ops": [{"op": k, "ms": round(ms, 4), "calls": round(c, 1)} for k, ms, c in per_op[:top]]}


def flops_per_sample(model: Optional[nn.Module], inputs: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The architecture's forward FLOPs per sample (None when the model is not a zoo model)."""
    from heygen_ray.models import ModelBase

    if not isinstance(model, ModelBase):
        return None
    return int(model.flops_per_sample({k: v[:1] for k, v in inputs.items()}))
