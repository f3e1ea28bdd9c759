"""The compression stage's specs: prune -> distill -> quantize -> measure -> register."""

from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import Field, model_validator

from heygen_ray.config.base import Spec, TrackingSpec, storage_field
from heygen_ray.config.train import TrainSpec


class PruneSpec(Spec):
    """Structured pruning (Torch-Pruning): ``ratio`` of each prunable group's channels / heads / FFN
    units removed. On a conv chain both sides of a layer shrink, so parameters and FLOPs fall by about
    1 - (1 - ratio)^2; on transformers (residual width kept) by about ``ratio`` of the block weights."""

    enabled: bool = True
    ratio: float = Field(default=0.5, ge=0.0, lt=1.0)
    importance: Literal["l1", "l2", "random", "taylor"] = "l2"
    round_to: Optional[int] = Field(default=8, ge=1, description="channel counts rounded to multiples of this")
    layer_ratios: Dict[str, float] = Field(default_factory=dict, description="{module name: ratio} overrides")
    global_pruning: bool = False
    unstructured_control: Optional[float] = Field(
        default=None, ge=0.0, lt=1.0, description="also build the unstructured magnitude-pruned control at this sparsity")


class DistillSpec(Spec):
    """The pruned student trains from the frozen teacher: alpha * KD(T) + (1 - alpha) * CE
    [+ hidden_weight * similarity-preserving loss on the pre-logits features]. alpha = 0 (and
    hidden_weight = 0) is plain fine-tuning (the no-teacher control)."""

    enabled: bool = True
    temperature: float = Field(default=2.0, gt=0.0)
    alpha: float = Field(default=0.7, ge=0.0, le=1.0)
    hidden_weight: float = Field(default=0.0, ge=0.0, description="hidden-state distillation: weight of the "
                                 "similarity-preserving loss between student and teacher features (any widths)")


class QuantizeSpec(Spec):
    """int8 scheme of the final variant (see heygen_ray/compress/quantize.py for formats):
    int8_static = PT2E + X86InductorQuantizer + calibration + compile with freezing;
    int8_dynamic = torchao W8A8 dynamic + compile; int8_qat = PT2E quantization-aware fine-tune
    (in the compression driver, distilling from the teacher) + compile. A bf16 variant is always built too."""

    scheme: Literal["int8_static", "int8_dynamic", "int8_qat"] = "int8_static"
    calibration_batches: int = Field(default=8, ge=1)
    qat_steps: int = Field(default=40, ge=1, description="int8_qat: fine-tuning steps under fake quantization "
                           "(distillation from the teacher, batches of 8 from the train split)")
    qat_lr: float = Field(default=1e-4, gt=0.0)
    export_pt2: bool = True


class GateSpec(Spec):
    """A variant whose quality (``metric``, default the task's primary metric) is more than
    ``max_drop`` below the teacher's is registered but gets no alias."""

    metric: Optional[str] = None
    max_drop: float = Field(default=0.01, ge=0.0)
    alias: str = Field(default="compressed", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


# The compression stage's reference variants, measured beside teacher_fp32 and the final int8 variant
# (always measured: the gate and the headline speedup need them).
REFERENCE_VARIANTS = ("teacher_bf16", "pruned", "pruned_distilled", "pruned_distilled_bf16", "pruned_distilled_compiled")


class MeasureSpec(Spec):
    variants: List[Literal[REFERENCE_VARIANTS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(REFERENCE_VARIANTS),
        description="reference variants measured, reported and registered beside teacher_fp32 and the final int8 "
        "variant; fewer is faster (a sweep trial, the quickstart)")
    rounds: int = Field(default=5, ge=1)
    iters: int = Field(default=10, ge=1)
    max_eval_rows: int = Field(default=512, ge=1)
    split: Literal["test", "val"] = "test"
    threads: Optional[int] = Field(default=None, ge=1, description="torch threads while measuring (default: all)")
    breakdown: bool = Field(default=False, description="also profile where one batch-1 call of teacher_fp32 and of "
                            "the final variant spends its time (compute operators, other operators, outside any; "
                            "torch.profiler): the variants' batch1_breakdown")


class CompressSpec(Spec):
    """The compression job. ``teacher``: a ``models:/name@alias`` URI or a checkpoint directory; when
    unset, a teacher is first trained with ``train`` for ``teacher_steps`` steps (quickstart/smoke).
    ``train`` is the student's training run (data, steps, optimiser, scaling); its model is the teacher's."""

    name: str = Field(default="compress", pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: Optional[str] = None
    teacher_steps: int = Field(default=400, ge=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    registered_model_name: Optional[str] = Field(default=None, description="register every variant as a version of this")
    run_dir: str = "runs"
    storage: Optional[str] = storage_field()
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _check(self) -> "CompressSpec":
        if self.train.task != "video_classification":
            raise ValueError(f"train.task: compression supports video_classification, not {self.train.task!r}")
        return self
