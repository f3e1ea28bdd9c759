"""What the driver hands every Ray Train worker: one validated :class:`WorkerConfig`.

The driver (heygen_ray.train.driver.run_training) builds and validates it before any worker starts;
it crosses to the workers as the plain dict of :meth:`WorkerConfig.to_dict` (Ray Train keeps its
``train_loop_config`` as a dict: its run-state export turns any other object into a string) and is
re-validated on arrival (:meth:`WorkerConfig.coerce`), like every spec that crosses a process
boundary. The loop reads attributes, never string keys.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Union

from pydantic import Field, field_validator

from heygen_ray.config import Spec, TrainSpec
from heygen_ray.train.checkpoint import checkpoints_root
from heygen_ray.train.precision import RECORD_FILE
from heygen_ray.train.tasks import DataInfo

PRECISIONS = ("fp32", "bf16", "fp16")


class DistillConfig(Spec):
    """Train the model against a frozen teacher (`tasks.DistillationTask`): the loss is
    alpha * KD(temperature) + (1 - alpha) * CE(labels), plus hidden_weight * the similarity of the
    two models' pre-logits features."""

    teacher: str = Field(min_length=1, description="the teacher: a model directory or URI (tracking.load_model)")
    temperature: float = Field(gt=0.0)
    alpha: float = Field(ge=0.0, le=1.0, description="0: plain fine-tuning on the labels")
    hidden_weight: float = Field(default=0.0, ge=0.0)


class WorkerConfig(Spec):
    """One training job's worker configuration (the same for every rank and every attempt)."""

    spec: TrainSpec
    data_info: DataInfo
    run_dir: str = Field(min_length=1, description="<spec.run_dir>/<name>: checkpoints, samples, precision record")
    tracking_uri: Optional[str] = Field(default=None, description="where registered models (init_from, judge) are read")
    has_val: bool = Field(default=False, description="a 'val' dataset was given to the trainer")
    train_materialized: bool = Field(default=False, description="the 'train' dataset is materialised: its rows are the "
                                     "same every epoch, so a worker may hold them (spec.hold_train_shard_mb)")
    peak_flops: Dict[str, float] = Field(default_factory=dict,
                                         description="measured peak FLOP/s per precision (the MFU denominators)")
    mlflow_run_id: Optional[str] = Field(default=None, description="the driver's MLflow run (None: not tracked)")
    init_model: Optional[str] = Field(default=None, description="start from this model (directory or URI) "
                                      "instead of building spec.model, e.g. a pruned student of another shape")
    distill: Optional[DistillConfig] = None

    @field_validator("data_info", mode="before")
    @classmethod
    def _data_info(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(DataInfo.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown DataInfo fields {unknown}")
            return DataInfo(**value)
        return value

    @field_validator("peak_flops", mode="before")
    @classmethod
    def _peak_flops(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # one figure for every precision
            return {p: float(value) for p in PRECISIONS}
        return {} if value is None else value

    @classmethod
    def build(cls, *, extra: Optional[Mapping[str, Any]] = None, **fields: Any) -> "WorkerConfig":
        """Validate ``fields`` plus the caller's ``extra`` keys (``init_model``, ``distill``); an
        unknown or ill-typed key fails here, on the driver, as a ConfigError naming it."""
        return cls.from_dict({**fields, **(extra or {})}, source="the training's worker config")

    @classmethod
    def coerce(cls, config: Union["WorkerConfig", Mapping[str, Any]]) -> "WorkerConfig":
        """A WorkerConfig from itself or from its :meth:`to_dict` (re-validated)."""
        return config if isinstance(config, WorkerConfig) else cls.from_dict(config, source="train_loop_config")

    def peak_for(self, precision: str) -> float:
        """The MFU denominator of a worker training in ``precision`` (0: unknown, no MFU)."""
        return self.spec.peak_flops or float(self.peak_flops.get(precision) or 0.0)

    @property
    def checkpoints_root(self) -> str:
        """The run's own checkpoint folder."""
        return checkpoints_root(self.run_dir)

    @property
    def precision_record(self) -> str:
        """Where rank 0 keeps the run's precision choice for its later attempts."""
        return os.path.join(self.run_dir, RECORD_FILE)

    @property
    def fault_marker(self) -> str:
        """Written when fault injection kills a worker: later attempts run unharmed."""
        return os.path.join(self.run_dir, f".fault-{self.spec.name}")
