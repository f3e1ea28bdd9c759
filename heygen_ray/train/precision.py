"""`precision: auto`: bf16 autocast where it is faster on this hardware, fp32 where it is not.

CPUs differ: with AMX (or AVX-512 BF16) a bf16 matmul runs several times faster than fp32; without
them bf16 is emulated and slower (measured 0.66x fp32 on such a CPU). So the choice is made on the
machine that trains, in two steps: the CPU flags say whether bf16 can pay at all (no hardware
support: fp32, no probe), then a short probe times the model's own forward + backward in both
precisions and keeps bf16 only when it is faster by a margin. On CUDA, bf16 where the GPU supports
it (no probe: it is always faster there), else fp32. fp16 is never chosen automatically: it needs a
gradient scaler and its range can overflow; ask for it explicitly.

Pure PyTorch, no Ray: each training worker calls `choose_precision` (rank 0 decides, the others
take its answer over torch.distributed) and the loop logs the decision.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, ContextManager, Dict, FrozenSet, Mapping, Optional

import torch
from torch import nn

from heygen_ray.hostcache import cached_measure

log = logging.getLogger(__name__)

RECORD_FILE = "precision.json"  # <run_dir>/precision.json: the run's choice, kept for its later attempts
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # hardware bf16 matmuls (AMX tiles, or AVX-512 dot products)
MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by this factor in the probe (timing noise on a busy machine)


@dataclass(frozen=True)
class PrecisionChoice:
    """What `auto` resolved to and why (logged as run params)."""

    precision: str  # fp32 | bf16 | fp16
    requested: str
    reason: str
    bf16_speedup: Optional[float] = None  # probe: fp32 step time / bf16 step time

    def to_params(self) -> Dict[str, str]:
        d = {f"precision_{k}": str(v) for k, v in asdict(self).items() if v is not None and k != "precision"}
        return {"precision_resolved": self.precision, **d}


def cpu_flags(path: str = "/proc/cpuinfo") -> FrozenSet[str]:
    """The CPU feature flags (Linux /proc/cpuinfo); empty where that file does not exist."""
    from heygen_ray.hostcache import read_cpuinfo

    return read_cpuinfo(path)[1]


def bf16_cpu_support(flags: FrozenSet[str]) -> Optional[str]:
    """The flag that gives this CPU hardware bf16 matmuls, or None."""
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def time_train_step(model: nn.Module, inputs: Mapping[str, torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor],
                    dtype: Optional[torch.dtype], device_type: str = "cpu", iters: int = 3) -> float:
    """Median seconds of a forward + backward of ``model`` on ``inputs`` under autocast(``dtype``)
    (None = fp32), after one warm-up step. ``loss_fn`` maps the output to a scalar."""
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            out = model(**inputs)
        loss_fn(out).backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step warms up (allocations, kernel selection)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def probe_bf16_speedup(model: nn.Module, inputs: Mapping[str, torch.Tensor],
                       loss_fn: Callable[[torch.Tensor], torch.Tensor], device_type: str = "cpu") -> float:
    """fp32 step time / bf16 step time of a copy of ``model`` (the model itself, its gradients and
    its BatchNorm statistics stay untouched), fp32 and bf16 alternated to share any load."""
    probe = copy.deepcopy(model).train()
    fp32, bf16 = [], []
    for _ in range(2):
        fp32.append(time_train_step(probe, inputs, loss_fn, None, device_type))
        bf16.append(time_train_step(probe, inputs, loss_fn, torch.bfloat16, device_type))
    return min(fp32) / max(min(bf16), 1e-12)


def resolve_precision(requested: str, device: torch.device, *, flags: Optional[FrozenSet[str]] = None,
                      probe: Optional[Callable[[], float]] = None) -> PrecisionChoice:
    """The precision to train with. ``requested`` other than ``auto`` is kept as is. ``flags``: the
    CPU flags (default: read from this machine); ``probe``: returns the measured bf16 speedup (only
    called on a CPU with hardware bf16)."""
    if requested != "auto":
        return PrecisionChoice(requested, requested, "set in the config")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", requested, f"CUDA device {torch.cuda.get_device_name(device)} supports bf16")
        return PrecisionChoice("fp32", requested, "CUDA device without bf16 (fp16 only when asked for)")
    if device.type != "cpu":
        return PrecisionChoice("fp32", requested, f"no bf16 policy for device {device.type!r}")
    flags = cpu_flags() if flags is None else flags
    support = bf16_cpu_support(flags)
    if support is None:
        return PrecisionChoice("fp32", requested, f"CPU has none of {', '.join(BF16_CPU_FLAGS)}: bf16 is emulated, slower")
    if probe is None:
        return PrecisionChoice("bf16", requested, f"CPU has {support} (not probed)")
    speedup = float(probe())
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", requested, f"CPU has {support}; bf16 step {speedup:.2f}x fp32", speedup)
    return PrecisionChoice("fp32", requested, f"CPU has {support} but bf16 step was only {speedup:.2f}x fp32", speedup)


def read_choice(path: str, requested: str) -> Optional[PrecisionChoice]:
    """The choice recorded at ``path`` by an earlier attempt of the same run, when it answered the same
    request (None: no record, an unreadable one, or one for another request)."""
    try:
        with open(path) as f:
            d = json.load(f)
        choice = PrecisionChoice(**d)
    except (OSError, ValueError, TypeError):
        return None
    return choice if choice.requested == requested else None


def write_choice(path: str, choice: PrecisionChoice) -> None:
    """Record ``choice`` for the run's later attempts (a retry after a failure, a resume): they train
    in the precision the checkpoints were made in, and log the same run params (MLflow refuses a
    changed param, and a second probe can measure differently)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(choice), f)
    os.replace(tmp, path)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision (None for fp32)."""
    if precision == "auto":
        raise ValueError("resolve precision 'auto' first (resolve_precision)")
    return AMP_DTYPES.get(precision)


def autocast(device_type: str, precision: str) -> Callable[[], ContextManager[Any]]:
    """A zero-argument factory of the autocast context of a resolved precision (a null context in fp32)."""
    dtype = amp_dtype(precision)

    def amp() -> ContextManager[Any]:
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    return amp


def choose_precision(spec: Any, model: nn.Module, task: Any, info: Any, device: torch.device,
                     world: int, record: Optional[str] = None) -> PrecisionChoice:
    """Resolve ``spec.precision`` (a TrainSpec's; ``auto``: CPU flags, then a probe of this model's
    own step at the training batch size). Rank 0 decides and every rank takes its answer, so all
    workers train alike. ``record``: a file where rank 0 keeps the run's choice; a later attempt of
    the run (a retry after a failure, a resume) takes it from there instead of probing again, so it
    trains in the precision its checkpoints were made in and logs the same run params."""
    import torch.distributed as dist

    shared = world > 1 and spec.precision == "auto"
    rank = dist.get_rank() if shared else 0
    choice: Optional[PrecisionChoice] = None
    if rank == 0:
        choice = read_choice(record, spec.precision) if record else None
        if choice is None:
            choice = _resolve(spec, model, task, info, device)
            if record:
                write_choice(record, choice)
    if shared:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    if spec.precision == "auto":
        log.warning("precision auto -> %s (%s)", choice.precision, choice.reason)
    return choice


def _resolve(spec: Any, model: nn.Module, task: Any, info: Any, device: torch.device) -> PrecisionChoice:
    batch = {k: v.to(device) for k, v in task.example_batch(info, spec.batch_size).items()}
    inputs, _ = task.inputs(batch)
    inputs = {**inputs, **task.forward_kwargs}

    def surrogate(out: Any) -> torch.Tensor:
        # the probe times the model's forward and backward; a task loss may involve more than the
        # model (a GAN's discriminator), so every float output is reduced the same way instead
        if isinstance(out, torch.Tensor):
            return out.float().pow(2).mean()
        values = out.values() if isinstance(out, Mapping) else out
        return sum(v.float().pow(2).mean() for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())

    # the same model at the same shapes on the same host measures once: later runs (and a sweep's
    # trials) read the answer back, so they take the same precision instead of a noisy re-measure
    key = {"model": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
           "inputs": sorted((k, tuple(v.shape), str(v.dtype)) for k, v in inputs.items() if isinstance(v, torch.Tensor)),
           "device": device.type, "threads": torch.get_num_threads()}
    hit = [False]

    def probe() -> float:
        value, hit[0] = cached_measure("bf16-probe", key, lambda: probe_bf16_speedup(model, inputs, surrogate, device.type))
        return value

    try:
        choice = resolve_precision(spec.precision, device, probe=probe)
    except RuntimeError as err:  # a model the probe cannot run in bf16 trains in fp32
        return PrecisionChoice("fp32", spec.precision, f"bf16 probe failed: {str(err).splitlines()[0][:200]}")
    return replace(choice, reason=f"{choice.reason} (probe cached on this host)") if hit[0] else choice
