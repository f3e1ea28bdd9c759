"""The training stage's specs: the task, the model, the optimisation, losses and scaling."""

from __future__ import annotations

import difflib
from typing import Any, Dict, Literal, Optional

from pydantic import Field, field_validator, model_validator

from heygen_ray.config.base import Spec, TrackingSpec, storage_field
from heygen_ray.config.data import DataSpec


class InitFromSpec(Spec):
    """Warm start: copy another model's weights into this one before training. Every tensor named
    ``source_prefix + rest`` in the source goes to ``target_prefix + rest`` here when the shapes match
    (e.g. a classifier's weights into a matcher's video tower: target_prefix ``video.``)."""

    uri: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION, or a logged model directory")
    source_prefix: str = ""
    target_prefix: str = ""
    freeze: bool = Field(default=False, description="keep the copied parameters fixed while training")
    lr_scale: float = Field(default=1.0, gt=0.0, le=1.0, description="learning-rate multiplier of the copied "
                            "parameters (fine-tune them gently: a full learning rate can undo in a few steps "
                            "what the source learned)")


class ModelSpec(Spec):
    """A registry preset plus constructor overrides (``heygen-ray models list`` shows the names)."""

    name: str = "cnn_video_micro"
    overrides: Dict[str, Any] = Field(default_factory=dict)
    init_from: Optional[InitFromSpec] = None

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        from heygen_ray.models import list_models  # the zoo is pure PyTorch: cheap to import

        if v not in list_models():
            close = difflib.get_close_matches(v, list_models(), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown model {v!r}{hint}; see `heygen-ray models list`")
        return v


class OptimSpec(Spec):
    """AdamW with decay / no-decay parameter groups (no decay on biases, norms, embeddings, tokens)."""

    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.05, ge=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-8, gt=0.0)
    grad_clip_norm: Optional[float] = Field(default=1.0, gt=0.0)


class ScheduleSpec(Spec):
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    warmup_start_factor: float = Field(default=1e-3, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)


class EMASpec(Spec):
    enabled: bool = True
    decay: float = Field(default=0.999, gt=0.0, lt=1.0)
    warmup: bool = True


class VideoLossSpec(Spec):
    """Weights of VideoGenerationLoss (text_to_video). ``adversarial_loss_weight > 0`` turns the GAN on:
    a 3D PatchGAN discriminator (``discriminator`` section) trained in the same loop."""

    pixel_loss_weight: float = Field(default=1.0, ge=0.0)
    perceptual_loss_weight: float = Field(default=0.2, ge=0.0)
    temporal_consistency_weight: float = Field(default=0.5, ge=0.0)
    frequency_loss_weight: float = Field(default=0.0, ge=0.0)
    adversarial_loss_weight: float = Field(default=0.0, ge=0.0)
    adversarial_start_step: int = Field(default=0, ge=0, description="generator's adversarial term from this step on")
    pixel_loss: Literal["l1", "mse"] = "l1"
    foreground_weight: float = Field(default=0.0, ge=0.0, description="pixel-loss weight of the target's "
                                     "foreground pixels is 1 + this (a small object is a few percent of a clip)")
    aligned_pixel_loss_weight: float = Field(default=0.0, ge=0.0, description="pixel loss against the target "
                                             "translated so its object lies on the generated one (the caption "
                                             "leaves the exact place open; this lets the object be drawn sharp)")
    alignment: Literal["clip", "frame"] = Field(default="clip", description="one translation per clip, or one per "
                                                "frame (also forgives where a sampled frame puts the object on its path)")
    alignment_search: int = Field(default=0, ge=0, le=8, description="refine each translation by the best-matching "
                                  "one within this many pixels (a centroid is pulled off the object by distractors)")
    trajectory_loss_weight: float = Field(default=0.0, ge=0.0, description="squared distance between a sprite "
                                          "generator's path and the target object's (needs a sprite generator)")


class DiscriminatorSpec(Spec):
    """The GAN discriminator of text_to_video: its size, and an optimizer and schedule of its own
    (Adam with beta1=0.5 and no weight decay, as is usual for hinge GANs)."""

    base_channels: int = Field(default=32, ge=1)
    num_layers: int = Field(default=3, ge=1, le=6)
    temporal_downsample_layers: int = Field(default=1, ge=0)
    optim: OptimSpec = Field(default_factory=lambda: OptimSpec(lr=2e-4, weight_decay=0.0, beta1=0.5, beta2=0.99))
    schedule: ScheduleSpec = Field(default_factory=lambda: ScheduleSpec(kind="constant"))


class JudgeSpec(Spec):
    """text_to_video: a registered video classifier that judges the generated clips at every
    evaluation (val_judge_accuracy: it names the caption's label; val_colour_accuracy: the object's
    dominant colour is the caption's)."""

    model: str = Field(description="models:/NAME@ALIAS or models:/NAME/VERSION of a video classifier trained on "
                       "the same labels and clip shape")


class MatchingLossSpec(Spec):
    """video_text_matching: contrastive (InfoNCE over the batch, both directions, duplicate captions
    as shared positives) plus the fused match head's binary cross-entropy on hard negatives."""

    contrastive_weight: float = Field(default=1.0, ge=0.0)
    match_weight: float = Field(default=1.0, ge=0.0)


class ScalingSpec(Spec):
    num_workers: int = Field(default=2, ge=0, description="0 = run the loop in the driver (debugging)")
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    use_gpu: bool = False


class FaultSpec(Spec):
    """Kill a worker on purpose to see recovery: rank ``rank`` exits at optimizer step ``step`` of the
    first attempt (``HEYGEN_FAULT=rank:step`` in the environment does the same)."""

    rank: int = Field(default=0, ge=0)
    step: int = Field(ge=1)


class TrainSpec(Spec):
    """One training job: a task, a model, the data, the optimisation and where it all goes."""

    name: str = Field(default="train", pattern=r"^[A-Za-z0-9_.-]+$", description="run name; re-running a name resumes it")
    task: Literal["video_classification", "language_modeling", "text_to_video", "video_text_matching"] = "video_classification"
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    steps: int = Field(default=200, ge=1, description="optimizer steps")
    batch_size: int = Field(default=16, ge=1, description="micro-batch per worker")
    grad_accum_steps: int = Field(default=1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 autocast where this machine runs it faster (CPU flags + a short "
        "probe of the model's step; bf16 on CUDA with bf16), else fp32; the choice is logged as run params")
    grad_checkpointing: bool = False
    compile: bool = False
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    ema: EMASpec = Field(default_factory=EMASpec)
    loss: VideoLossSpec = Field(default_factory=VideoLossSpec)
    discriminator: DiscriminatorSpec = Field(default_factory=DiscriminatorSpec)
    matching_loss: MatchingLossSpec = Field(default_factory=MatchingLossSpec)
    judge: Optional[JudgeSpec] = None
    log_every_n_steps: int = Field(default=10, ge=1)
    eval_every_n_steps: int = Field(default=100, ge=1)
    checkpoint_every_n_steps: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0)
    fault: Optional[FaultSpec] = None
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    run_dir: str = Field(default="runs", description="checkpoints, results.json and the default MLflow store")
    storage: Optional[str] = storage_field()
    peak_flops: Optional[float] = Field(default=None, gt=0.0, description="FLOP/s for MFU; default: measured matmul peak")
    seed: int = 0
    hold_train_shard_mb: float = Field(
        default=256.0, ge=0.0, description="a materialised (cached) training split: each worker keeps the rows of "
        "its first epoch in memory when they take at most this many MB, and later epochs are permutations of them "
        "(seed + epoch) instead of a new Ray Data execution each; 0: every epoch streams from Ray Data")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.schedule.warmup_steps >= self.steps:
            raise ValueError(f"schedule.warmup_steps={self.schedule.warmup_steps} must be < steps={self.steps}")
        if self.judge is not None and self.task != "text_to_video":
            raise ValueError(f"judge applies to task text_to_video, not {self.task!r}")
        if self.loss.adversarial_loss_weight > 0 and self.task != "text_to_video":
            raise ValueError(f"loss.adversarial_loss_weight applies to task text_to_video, not {self.task!r}")
        if self.discriminator.schedule.warmup_steps >= self.steps:
            raise ValueError(f"discriminator.schedule.warmup_steps={self.discriminator.schedule.warmup_steps} must be < steps={self.steps}")
        if self.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("precision='fp16' needs scaling.use_gpu=true (CPU autocast is bf16); use 'bf16' or 'fp32'")
        return self
