"""Spec kinds: the name of each configs/<kind>/ folder -> its spec class, and each kind's
``--smoke-test`` sizes. Imports every stage module, so it sits above them all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Type, Union

from heygen_ray.config.base import ConfigError, Spec
from heygen_ray.config.compress import CompressSpec
from heygen_ray.config.data import DataSpec, SynthSpec
from heygen_ray.config.pipeline import PipelineSpec
from heygen_ray.config.serve import ServeSpec
from heygen_ray.config.train import TrainSpec
from heygen_ray.config.tune import SweepSpec

SPEC_KINDS: Dict[str, Type[Spec]] = {
    "data": DataSpec,
    "train": TrainSpec,
    "synth": SynthSpec,
    "pipeline": PipelineSpec,
    "sweep": SweepSpec,
    "compress": CompressSpec,
    "serve": ServeSpec,
}


def spec_kind_for(path: Union[str, os.PathLike]) -> Type[Spec]:
    """Pick the spec class from the configs/<kind>/ folder a YAML lives in."""
    parent = Path(path).resolve().parent.name
    if parent in SPEC_KINDS:
        return SPEC_KINDS[parent]
    raise ConfigError(
        f"{path}: cannot tell the spec kind from folder {parent!r}; pass --kind one of {', '.join(SPEC_KINDS)}"
    )


# Sizes for ``--smoke-test``: each job runs on 2 CPUs in a minute or two.
_COMPRESS_SMOKE: List[str] = [
    "teacher_steps=24", "train.steps=12", "train.checkpoint_every_n_steps=12", "train.eval_every_n_steps=12",
    "train.log_every_n_steps=4", "train.batch_size=4", "train.schedule.warmup_steps=2",
    "train.data.synth.num_clips=48", "train.data.synth.output_dir=data/smoke_compress", "train.data.video.cache=true",
    "quantize.calibration_batches=2", "measure.rounds=2", "measure.iters=3", "run_dir=runs/smoke",
]

SMOKE_OVERRIDES: Dict[str, List[str]] = {
    "data": ["synth.num_clips=32", "synth.output_dir=data/smoke", "synth.descriptions_per_clip=1"],
    "train": ["steps=12", "checkpoint_every_n_steps=6", "eval_every_n_steps=6", "log_every_n_steps=3",
              "batch_size=4", "data.synth.num_clips=32", "data.synth.output_dir=data/smoke", "schedule.warmup_steps=2",
              "data.video.cache=true"],  # decoded once: a new decoder pool every 3-step epoch cost more than the steps
    "compress": list(_COMPRESS_SMOKE),
    "pipeline": ["smoke=true", "data.synth.num_clips=48", "data.synth.output_dir=data/smoke_pipeline",
                 "output_dir=runs/smoke_pipeline", "data.synth.descriptions_per_clip=1"],
    "sweep": ["search.num_samples=4", "max_concurrent_trials=2", "train.steps=24", "train.eval_every_n_steps=6",
              "train.log_every_n_steps=6", "train.batch_size=8", "train.data.synth.num_clips=32",
              "train.data.synth.output_dir=data/smoke", "train.data.synth.descriptions_per_clip=1",
              "scheduler.grace_period=6", "run_dir=runs/smoke_sweeps"],
    # A compression sweep (stage compress): 2 trials over the compression smoke sizes, nested under the
    # sweep's ``train`` section (the sweep keeps its own run_dir).
    "sweep_compress": ["search.num_samples=2", "run_dir=runs/smoke_sweeps"]
    + [f"train.{o}" for o in _COMPRESS_SMOKE if not o.startswith("run_dir=")],
}
