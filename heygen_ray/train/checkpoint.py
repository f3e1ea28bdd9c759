"""The one checkpoint directory format, written and read by one pair of functions.

    <dir>/
      model.safetensors     weights of the (unwrapped) model
      ema.safetensors       EMA weights (when EMA is on): torch's AveragedModel, so the model's
                            tensors under "module." plus its "n_averaged" counter
      extra/<name>.safetensors  any other module (e.g. a discriminator)
      state.pt              optimizer, scheduler, grad-scaler and torch RNG states: tensors and plain
                            containers only, read back with torch.load(weights_only=True); the
                            states of extra parts under "extra_<name>"
      meta.json             schema version, step, epoch, data position, python/numpy RNG, the resolved
                            spec, free-form extras

A training keeps them as ``<run_dir>/<name>/checkpoints/step_XXXXXXXX`` (:func:`commit_checkpoint`);
Ray Train keeps a copy of each reported one under its storage path (a job's ``checkpoint_uri``).
Every file and part name of the format is defined in this module, once.

Loading never unpickles arbitrary objects: safetensors and JSON, plus torch's restricted
``weights_only`` loader for optimizer state.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

SCHEMA_VERSION = 1

# the files of a checkpoint directory
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
EXTRA_DIR = "extra"  # extra/<module name>.safetensors
STATE_FILE = "state.pt"
META_FILE = "meta.json"  # written last: a directory with it is complete
CHECKPOINTS_DIR = "checkpoints"  # <run_dir>/<name>/checkpoints/step_XXXXXXXX
EMA_PREFIX = "module."  # an AveragedModel's own tensors are its module's under this prefix

# the extra parts of a GAN: extra/discriminator.safetensors, state.pt "extra_discriminator_optimizer"
# and "extra_discriminator_scaler"
DISCRIMINATOR = "discriminator"
DISCRIMINATOR_OPTIMIZER = "discriminator_optimizer"
DISCRIMINATOR_SCALER = "discriminator_scaler"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (wrong schema, missing files, mismatched shapes)."""


@dataclass
class CheckpointMeta:
    step: int
    epoch: int = 0
    data_position: Dict[str, Any] = field(default_factory=dict)
    spec: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


def _extra_path(directory: str, name: str) -> str:
    return os.path.join(directory, EXTRA_DIR, f"{name}.safetensors")


def _extra_key(name: str) -> str:
    return f"extra_{name}"


@dataclass
class CheckpointParts:
    """The live objects one checkpoint holds, by part name: the keyword arguments of
    :func:`save_checkpoint` / :func:`load_checkpoint`. ``modules``: extra modules by name (e.g. the
    discriminator); ``optimizers``: extra objects with a state_dict (its optimizer, its grad scaler)."""

    model: nn.Module
    ema: Optional[nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[Any] = None
    scaler: Optional[Any] = None
    modules: Dict[str, nn.Module] = field(default_factory=dict)
    optimizers: Dict[str, Any] = field(default_factory=dict)

    def to_save(self) -> Dict[str, Any]:
        """Everything, for :func:`save_checkpoint` / :func:`commit_checkpoint`."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "modules": dict(self.modules), "optimizers": dict(self.optimizers)}

    def to_restore(self) -> Dict[str, Any]:
        """What a resume restores, for :func:`load_checkpoint`: everything but the scheduler. The LR
        schedule is rebuilt from the step and the current plan instead (a restored one would keep
        the old horizon when a resumed job extends ``steps``, and a changed schedule kind would not
        load at all); its saved state is there for inspection only."""
        parts = self.to_save()
        del parts["scheduler"]
        return parts


def _tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views: store plain contiguous copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    import ast

    if "python" in state:
        random.setstate(ast.literal_eval(state["python"]))  # literal tuples only, no code
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    directory: str,
    *,
    model: nn.Module,
    step: int,
    ema: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    scaler: Optional[Any] = None,
    modules: Optional[Mapping[str, nn.Module]] = None,
    optimizers: Optional[Mapping[str, Any]] = None,
    epoch: int = 0,
    data_position: Optional[Dict[str, Any]] = None,
    spec: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> str:
    """Write a checkpoint into ``directory`` (created). ``modules``/``optimizers`` hold extra named
    parts (e.g. a GAN discriminator and its optimizer). Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    save_file(_tensors(model), os.path.join(directory, MODEL_FILE))
    if ema is not None:
        save_file(_tensors(ema), os.path.join(directory, EMA_FILE))
    for name, mod in (modules or {}).items():
        os.makedirs(os.path.join(directory, EXTRA_DIR), exist_ok=True)
        save_file(_tensors(mod), _extra_path(directory, name))
    state: Dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    for name, obj in (optimizers or {}).items():
        state[_extra_key(name)] = obj.state_dict()
    torch.save(state, os.path.join(directory, STATE_FILE))
    meta = CheckpointMeta(step=step, epoch=epoch, data_position=data_position or {}, spec=spec or {}, extra=extra or {})
    payload = dict(meta.__dict__, rng=_rng_state(), saved_at=time.time())
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return directory


def read_meta(directory: str) -> CheckpointMeta:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a heygen_ray checkpoint (no meta.json)")
    with open(path) as f:
        payload = json.load(f)
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{directory}: checkpoint schema {payload.get('schema_version')} != {SCHEMA_VERSION}")
    return CheckpointMeta(**{k: payload[k] for k in CheckpointMeta.__dataclass_fields__ if k in payload})


def load_weights(module: nn.Module, path: str, strict: bool = True) -> None:
    try:
        missing, unexpected = module.load_state_dict(load_file(path), strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit {type(module).__name__}: {err}") from None


def load_checkpoint(
    directory: str,
    *,
    model: nn.Module,
    ema: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    scaler: Optional[Any] = None,
    modules: Optional[Mapping[str, nn.Module]] = None,
    optimizers: Optional[Mapping[str, Any]] = None,
    restore_rng: bool = True,
) -> CheckpointMeta:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns the metadata."""
    meta = read_meta(directory)
    load_weights(model, os.path.join(directory, MODEL_FILE))
    if ema is not None:
        path = os.path.join(directory, EMA_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{directory}: has no EMA weights but EMA is on")
        load_weights(ema, path)
    for name, mod in (modules or {}).items():
        load_weights(mod, _extra_path(directory, name))
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    for name, obj in (optimizers or {}).items():
        obj.load_state_dict(state[_extra_key(name)])
    if restore_rng:
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        with open(os.path.join(directory, META_FILE)) as f:
            _set_rng_state(json.load(f).get("rng", {}))
    return meta


def commit_checkpoint(root: str, keep: int, *, step: int, **parts: Any) -> str:
    """Write ``<root>/step_<step>`` (under a temporary name, then renamed, so a crash never leaves half
    a checkpoint that looks complete) and keep only the ``keep`` newest. ``parts``: as for
    :func:`save_checkpoint`. Returns the checkpoint directory."""
    import shutil

    path = os.path.join(root, f"step_{step:08d}")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
    save_checkpoint(tmp, step=step, **parts)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    prune_checkpoints(root, keep)
    return path


def checkpoints_root(run_dir: str) -> str:
    """Where a training keeps its own checkpoints: ``<run_dir>/checkpoints`` (``run_dir`` is the job's
    ``<spec.run_dir>/<name>``)."""
    return os.path.join(run_dir, CHECKPOINTS_DIR)


def latest_checkpoint(root: str) -> Optional[str]:
    """The highest-step complete checkpoint under ``root`` (``step_XXXXXXXX`` folders; a folder counts
    once its meta.json, written last, exists)."""
    done = _complete(root)
    return os.path.join(root, done[-1]) if done else None


def prune_checkpoints(root: str, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints under ``root``."""
    import shutil

    done = _complete(root)
    for d in done[: max(len(done) - keep, 0)]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _complete(root: str) -> List[str]:
    """Complete ``step_XXXXXXXX`` folders under ``root``, oldest first (meta.json is written last)."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(root, d, META_FILE)))


def load_final_weights(path: str) -> Dict[str, torch.Tensor]:
    """The final weights of a training as a state dict of the model: the EMA weights when the
    checkpoint has them (what training logs as its final model), else the raw ones. Read from
    safetensors only (nothing is unpickled); tensors on the CPU.

    ``path`` is one of:

    * a checkpoint directory of this format (``model.safetensors``, and ``ema.safetensors`` when EMA
      was on): ``<run_dir>/<name>/checkpoints/step_XXXXXXXX``, or Ray Train's copy of it (a job's
      ``checkpoint_uri``);
    * a folder of such checkpoints (``<run_dir>/<name>/checkpoints``): its newest complete one;
    * a run directory (``<run_dir>/<name>``, which holds ``checkpoints/``): its newest complete one.

    ``ema.safetensors`` holds an AveragedModel: its tensors lose their ``module.`` prefix and its
    ``n_averaged`` counter is left out, so the result loads into the bare model with ``strict=True``.
    Raises CheckpointError when ``path`` is none of these."""
    directory = _final_checkpoint_dir(path)
    ema = os.path.join(directory, EMA_FILE)
    if os.path.isfile(ema):
        return {k[len(EMA_PREFIX):]: v for k, v in load_file(ema).items() if k.startswith(EMA_PREFIX)}
    return load_file(os.path.join(directory, MODEL_FILE))


def _final_checkpoint_dir(path: str) -> str:
    """The checkpoint directory ``path`` names (see :func:`load_final_weights`)."""
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    for root in (path, os.path.join(path, CHECKPOINTS_DIR)):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: neither a checkpoint directory (no {MODEL_FILE}) nor a folder or run "
                          f"directory with complete checkpoints (step_XXXXXXXX/{META_FILE})")
