"""Validated specs for every stage: YAML + dotted overrides -> one pydantic spec.

Conventions:
* Every spec is a pydantic model with ``extra="forbid"`` and ``strict=True``: a misspelled key, a
  float where an int is wanted ("8.0" from a sweep sampler) or a string where a number is wanted
  fails before anything runs.
* Errors are :class:`ConfigError` and name the source (the YAML file or the override) and the dotted
  field path, with a "did you mean" for misspelled keys.
* Specs cross process boundaries as plain dicts (``spec.to_dict()``) and are re-validated on arrival
  (``SpecCls.from_dict(d)``).

Stage specs are named ``*Spec`` so they never shadow Ray's ``ScalingConfig``/``RunConfig``/``DataConfig``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

S = TypeVar("S", bound="Spec")


class ConfigError(ValueError):
    """A configuration problem, reported before anything runs. The message names where and what."""


class Spec(BaseModel):
    """Base of every stage spec: strict, closed, dumpable."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, validate_assignment=True)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (what crosses Ray process boundaries)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved spec as YAML (loads back to an equal spec)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Short content hash of the resolved spec (stable across key order)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls: Type[S], data: Mapping[str, Any], *, source: str = "<dict>") -> S:
        """Validate a plain dict (e.g. one that crossed a process boundary)."""
        return validate_spec(cls, data, source=source)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, error formatting
# --------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (Tune samples numpy values); a float stays a float, so an
    int field given 8.0 still fails loudly."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _fields_at(spec_cls: Type[BaseModel], path: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The field names available at a dotted prefix, or None if the prefix is free-form."""
    cls: Any = spec_cls
    for part in path:
        fields = _model_fields(cls)
        if fields is None:
            return None
        if part not in fields:
            return {}
        cls = fields[part]
    return _model_fields(cls)


def _model_fields(annotation: Any) -> Optional[Dict[str, Any]]:
    """Map field name -> annotation for a (possibly Optional/Union) pydantic model annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {name: f.annotation for name, f in annotation.model_fields.items()}
    if get_origin(annotation) is Union or str(get_origin(annotation)) == "types.UnionType":
        merged: Dict[str, Any] = {}
        found = False
        for arg in get_args(annotation):
            sub = _model_fields(arg)
            if sub is not None:
                merged.update(sub)
                found = True
        return merged if found else None
    return None


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_errors(spec_cls: Type[BaseModel], err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            fields = _fields_at(spec_cls, loc[:-1]) or {}
            msg = f"unknown field{_suggest(loc[-1], fields)}; allowed: {', '.join(sorted(fields))}"
        else:
            msg = e["msg"]
            if "input" in e and e["type"] not in ("missing",):
                got = e["input"]
                if not isinstance(got, (dict, list)):
                    msg += f" (got {got!r} of type {type(got).__name__})"
        lines.append(f"  {source}: {dotted}: {msg}")
    kind = spec_cls.__name__
    return f"invalid {kind} ({len(lines)} error{'s' if len(lines) > 1 else ''}):\n" + "\n".join(lines)


def validate_spec(spec_cls: Type[S], data: Mapping[str, Any], *, source: str = "<dict>") -> S:
    """Validate ``data`` into ``spec_cls``; raise :class:`ConfigError` naming source + dotted path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return spec_cls.model_validate(_plain(dict(data)))
    except ValidationError as err:
        raise ConfigError(_format_errors(spec_cls, err, source)) from None


def load_yaml(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a YAML mapping; missing files and syntax errors become ConfigErrors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"video.clip_frames=8"`` -> (["video", "clip_frames"], 8). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty path component in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return parts, value


def apply_overrides(spec_cls: Type[BaseModel], data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply dotted overrides to a raw dict, checking every path against ``spec_cls``'s fields."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        for depth, part in enumerate(parts):
            fields = _fields_at(spec_cls, parts[:depth])
            if fields is not None and part not in fields:
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {text!r}: unknown field {where!r}{_suggest(part, fields)}; "
                    f"allowed at this level: {', '.join(sorted(fields))}"
                )
        set_path(out, ".".join(parts), value)
    return out


def set_path(data: Dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating (or replacing a non-dict with) dicts on the way."""
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_spec(
    spec_cls: Type[S],
    path: Union[str, os.PathLike, None] = None,
    overrides: Sequence[str] = (),
    *,
    data: Optional[Mapping[str, Any]] = None,
) -> S:
    """YAML file (or a dict) + dotted overrides -> validated spec. Fails before anything runs."""
    raw: Dict[str, Any] = dict(data) if data is not None else (load_yaml(path) if path is not None else {})
    raw = apply_overrides(spec_cls, raw, list(overrides))
    source = str(path) if path is not None else "<config>"
    if overrides:
        source += f" + overrides [{', '.join(overrides)}]"
    return validate_spec(spec_cls, raw, source=source)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------

class RaySpec(Spec):
    """How a job reaches Ray. ``address=None`` starts a local Ray (or joins the one a job runs in)."""

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(default=None, ge=1, description="only when starting a local Ray")
    object_store_memory_mb: Optional[int] = Field(default=None, ge=64)
    log_to_driver: bool = Field(default=True, description="print the Ray workers' logs on this console; off: they "
                                "stay in the session's log folder (printed at the end) and the console shows progress")


class SplitSpec(Spec):
    train: float = Field(default=0.8, ge=0.0, le=1.0)
    val: float = Field(default=0.1, ge=0.0, le=1.0)
    test: float = Field(default=0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitSpec":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1.0, got {total:g}")
        return self


# --------------------------------------------------------------------------------------------------
# Data stage
# --------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
DIRECTIONS = ("left", "right", "up", "down")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
}
SPEEDS = {"slowly": 0.6, "quickly": 1.4}  # shape-sizes travelled over the clip, see data/synthetic.py


class SynthSpec(Spec):
    """The embedded data set: captioned clips of moving shapes encoded as real H.264 mp4."""

    output_dir: str = "data/quickstart"
    num_clips: int = Field(default=240, ge=1)
    frames: int = Field(default=16, ge=2, le=512)
    height: int = Field(default=64, ge=16, le=224)
    width: int = Field(default=64, ge=16, le=224)
    fps: int = Field(default=8, ge=1, le=120)
    seed: int = 0
    shapes: List[Literal["circle", "square", "triangle", "diamond", "cross", "ring"]] = Field(
        default_factory=lambda: ["circle", "square", "triangle", "diamond"], min_length=1
    )
    directions: List[Literal["left", "right", "up", "down"]] = Field(
        default_factory=lambda: list(DIRECTIONS), min_length=1
    )
    colors: List[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow", "magenta", "cyan"], min_length=1)
    speeds: List[Literal["slowly", "quickly"]] = Field(default_factory=lambda: ["slowly", "quickly"], min_length=1)
    noise_std: float = Field(default=0.04, ge=0.0, le=0.5, description="background noise, fraction of 255")
    max_distractors: int = Field(default=1, ge=0, le=8, description="static grey shapes per clip, 0..max")
    split: SplitSpec = Field(default_factory=SplitSpec)
    crf: int = Field(default=18, ge=0, le=51, description="x264 quality (lower = better, bigger files)")
    x264_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = Field(
        default="veryfast", description="x264 speed/compression trade-off (veryfast: 3x medium's speed, files 8% smaller "
        "at crf 18 on this set, measured)")
    descriptions_per_clip: int = Field(default=2, ge=0, le=16, description="long scene descriptions in the text corpus")
    clips_per_task: int = Field(default=32, ge=1, description="clips generated by one Ray task")

    @model_validator(mode="after")
    def _check(self) -> "SynthSpec":
        if self.height % 2 or self.width % 2:
            raise ValueError(f"height and width must be even for H.264 yuv420p, got {self.height}x{self.width}")
        return self

    @field_validator("colors")
    @classmethod
    def _known_colors(cls, v: List[str]) -> List[str]:
        unknown = [c for c in v if c not in COLORS]
        if unknown:
            raise ValueError(f"unknown colors {unknown}; known: {', '.join(COLORS)}")
        return v

    @field_validator("shapes", "directions", "colors", "speeds")
    @classmethod
    def _no_duplicates(cls, v: List[str]) -> List[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        return v

    @property
    def label_names(self) -> List[str]:
        """Class labels: shape x direction (e.g. 'circle_left'); colour and speed are nuisances."""
        return [f"{s}_{d}" for s in self.shapes for d in self.directions]


class ManifestColumnsSpec(Spec):
    """Column names in a user's manifest (the embedded set uses the defaults)."""

    path: str = "path"
    label: Optional[str] = "label"
    caption: Optional[str] = "caption"
    split: Optional[str] = "split"


class VideoDataSpec(Spec):
    """The Ray Data video pipeline: manifest -> PyAV decode -> T sampled frames -> uint8 (T,H,W,3)."""

    manifest: Optional[str] = Field(
        default=None, description="parquet/CSV/JSONL manifest: local path or pyarrow URI (s3://...); "
        "default: <synth.output_dir>/manifest.parquet"
    )
    columns: ManifestColumnsSpec = Field(default_factory=ManifestColumnsSpec)
    clip_frames: int = Field(default=8, ge=1, le=512)
    height: int = Field(default=32, ge=8, le=1024)
    width: int = Field(default=32, ge=8, le=1024)
    sampling: Literal["auto", "uniform", "random"] = Field(
        default="auto", description="auto: random segment offsets for train, uniform otherwise"
    )
    short_clips: Literal["pad", "drop"] = Field(default="pad", description="clips with fewer than clip_frames frames")
    resize: Literal["squash", "center_crop"] = "squash"
    decode_threads: int = Field(default=1, ge=0, le=16, description="PyAV threads per decoder (0 = auto)")
    decode_batch_size: int = Field(default=16, ge=1)
    num_decoders: Optional[int] = Field(default=None, ge=1, description="decoder actors; default: cluster CPUs")
    decoder_num_cpus: float = Field(default=1.0, gt=0.0, le=64.0)
    cache: bool = Field(
        default=False, description="decode once and keep the clips in the object store for later epochs "
        "(fast for small sets; with random sampling every epoch then sees the same frames)"
    )
    cache_eval_max_mb: float = Field(
        default=1024.0, ge=0.0, description="training's validation split is decoded once and kept in the object "
        "store when its decoded clips take at most this many MB (it is read whole at every evaluation); 0: stream it")
    seed: int = 0

    def decoded_mb(self, rows: int) -> float:
        """The size of ``rows`` decoded clips (uint8 T x H x W x 3) in MB."""
        return rows * self.clip_frames * self.height * self.width * 3 / 2**20

    def cache_split(self, split: str, rows: int) -> bool:
        """Whether training materialises ``split``: the train split when ``cache`` is on; the
        validation split also when it is small (``cache_eval_max_mb``)."""
        return self.cache or (split != "train" and self.decoded_mb(rows) <= self.cache_eval_max_mb)


class TextDataSpec(Spec):
    """The Ray Data text pipeline: corpus -> byte-level BPE -> packed fixed-length sequences."""

    corpus: Optional[str] = Field(default=None, description="JSONL/parquet corpus; default: <synth.output_dir>/corpus.jsonl")
    text_field: str = "text"
    tokenizer_dir: Optional[str] = Field(default=None, description="default: <synth.output_dir>/tokenizer")
    vocab_size: int = Field(default=1024, ge=260, le=1_000_000)
    min_frequency: int = Field(default=2, ge=1)
    seq_len: int = Field(default=64, ge=2, le=1_000_000)
    caption_max_tokens: int = Field(default=24, ge=2, le=4096)
    batch_size: int = Field(default=256, ge=1)
    num_tokenizers: int = Field(default=1, ge=1)
    tokenizer_num_cpus: float = Field(default=0.5, gt=0.0)


class DataSpec(Spec):
    """The data stage: optionally generate the embedded set, then the video and text pipelines."""

    synth: Optional[SynthSpec] = Field(default_factory=SynthSpec)
    video: VideoDataSpec = Field(default_factory=VideoDataSpec)
    text: TextDataSpec = Field(default_factory=TextDataSpec)

    @model_validator(mode="after")
    def _resolve(self) -> "DataSpec":
        root = self.synth.output_dir if self.synth is not None else None
        missing = []
        if self.video.manifest is None:
            missing.append("video.manifest")
        if self.text.corpus is None:
            missing.append("text.corpus")
        if self.text.tokenizer_dir is None:
            missing.append("text.tokenizer_dir")
        if missing and root is None:
            raise ValueError(f"{', '.join(missing)} must be set when there is no synth section")
        # Assign through __dict__: validate_assignment would re-run this validator recursively.
        if self.video.manifest is None:
            self.video.__dict__["manifest"] = f"{root}/manifest.parquet"
        if self.text.corpus is None:
            self.text.__dict__["corpus"] = f"{root}/corpus.jsonl"
        if self.text.tokenizer_dir is None:
            self.text.__dict__["tokenizer_dir"] = f"{root}/tokenizer"
        if self.synth is not None and self.video.short_clips == "drop" and self.synth.frames < self.video.clip_frames:
            raise ValueError(
                f"video.clip_frames={self.video.clip_frames} > synth.frames={self.synth.frames} with "
                "video.short_clips='drop' would drop every generated clip; use short_clips='pad' or fewer clip_frames"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Tracking (MLflow)
# --------------------------------------------------------------------------------------------------


class TrackingSpec(Spec):
    """Where runs go. ``tracking_uri=None``: ``MLFLOW_TRACKING_URI`` if set, else a sqlite database and
    an artifact folder under the job's run directory (absolute paths: Train workers change directory)."""

    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment: str = "heygen_ray"
    registered_model_name: Optional[str] = Field(default=None, description="register the final model under this name")
    parent_run_id: Optional[str] = None
    tags: Dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


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
    peak_flops: Optional[float] = Field(default=None, gt=0.0, description="FLOP/s for MFU; default: measured matmul peak")
    seed: int = 0
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


# --------------------------------------------------------------------------------------------------
# The pipeline (grows with each stage)
# --------------------------------------------------------------------------------------------------


PIPELINE_STAGES = ("data", "train", "tune", "compress", "evaluate", "serve")


class StageRefSpec(Spec):
    """A stage of the pipeline: the stage's own YAML plus dotted overrides (``{optim.lr: 0.01}``).
    The pipeline then sets what it owns: the data set (``data.synth``), the run folder and tracking."""

    config: str = Field(description="the stage YAML (relative to the working directory)")
    overrides: Dict[str, Any] = Field(default_factory=dict, description="dotted path -> value, applied over the YAML")
    smoke_overrides: Dict[str, Any] = Field(
        default_factory=dict, description="with --smoke-test: dotted path -> value, applied after the stage's smoke sizes")


class ChampionGateSpec(Spec):
    """The trained model gets the champion alias only when ``metric`` (a final reported metric, e.g.
    val_ema_accuracy) is at least ``min_value`` (or at most ``max_value``)."""

    metric: str
    min_value: Optional[float] = None
    max_value: Optional[float] = None

    @model_validator(mode="after")
    def _one(self) -> "ChampionGateSpec":
        if (self.min_value is None) == (self.max_value is None):
            raise ValueError("give exactly one of min_value, max_value")
        return self


class PipelineTrainSpec(StageRefSpec):
    gate: Optional[ChampionGateSpec] = None


class PipelineCompressSpec(StageRefSpec):
    teacher: str = Field(description="the train entry whose registered model is the teacher")


class PipelineEvaluateSpec(Spec):
    """Score a stage's champion on other data (e.g. the embedded set drawn with another seed: clips no
    model of the pipeline has seen). ``data_overrides`` (dotted paths) apply over the pipeline's data
    section; a new ``synth.output_dir`` gets its own manifest and corpus (the models keep their
    tokenizer)."""

    model: str = Field(description="train.<entry>, tune or compress: that stage's champion")
    data_overrides: Dict[str, Any] = Field(default_factory=dict)
    split: Optional[str] = Field(default="test", description="the manifest split to score (null: every row)")
    min_value: Optional[Dict[str, float]] = Field(default=None, description="metric -> the least value expected; "
                                                  "reported as passed or not (the pipeline does not fail on it)")


class PipelineServeSpec(StageRefSpec):
    """Which stage's model each endpoint serves: ``train.<entry>``, ``tune`` or ``compress``
    (the champion alias of what that stage registered); null leaves the endpoint off."""

    classify: Optional[str] = None
    generate: Optional[str] = None
    complete: Optional[str] = None
    match: Optional[str] = None
    keep_running: bool = Field(default=True, description="leave Serve running when the pipeline ends "
                               "(make stop / heygen-ray serve stop); false: shut it down after the smoke requests")


class PipelineSpec(Spec):
    """The end-to-end job: data -> train -> tune -> compress -> serve. Only the stages listed in
    ``stages`` run, in that order. Each stage's outcome is kept in ``<output_dir>/ledger.json`` under a
    content key (its resolved spec, its inputs, the data fingerprint, the code version): a stage whose
    key is unchanged is skipped; an unfinished training resumes from its checkpoint."""

    name: str = Field(default="quickstart", pattern=r"^[A-Za-z0-9_.-]+$")
    stages: List[Literal["data", "train", "tune", "compress", "evaluate", "serve"]] = Field(default_factory=lambda: ["data"], min_length=1)
    output_dir: str = "runs/quickstart"
    data: DataSpec = Field(default_factory=DataSpec)
    train: Dict[str, PipelineTrainSpec] = Field(default_factory=dict, description="entry name -> training stage")
    tune: Optional[StageRefSpec] = None
    compress: Optional[PipelineCompressSpec] = None
    evaluate: Dict[str, PipelineEvaluateSpec] = Field(default_factory=dict, description="entry name -> evaluation")
    serve: Optional[PipelineServeSpec] = None
    champion_alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    smoke: bool = Field(default=False, description="apply each stage's --smoke-test sizes (after the entry overrides)")
    tracking: TrackingSpec = Field(default_factory=lambda: TrackingSpec(experiment="heygen_ray_pipeline"))
    ray: RaySpec = Field(default_factory=RaySpec)

    @model_validator(mode="after")
    def _check(self) -> "PipelineSpec":
        order = [s for s in PIPELINE_STAGES if s in self.stages]
        if list(self.stages) != order or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages: list each stage once, in the order {list(PIPELINE_STAGES)}; got {list(self.stages)}")
        for stage in ("tune", "compress", "serve"):
            if stage in self.stages and getattr(self, stage) is None:
                raise ValueError(f"stages lists {stage!r} but the {stage} section is missing")
        if "train" in self.stages and not self.train:
            raise ValueError("stages lists 'train' but the train section has no entry")
        if "evaluate" in self.stages and not self.evaluate:
            raise ValueError("stages lists 'evaluate' but the evaluate section has no entry")
        for name, ev in self.evaluate.items():
            stage, _, entry = ev.model.partition(".")
            ok = (stage == "train" and entry in self.train) or (stage in ("tune", "compress") and not entry)
            if "evaluate" in self.stages and not (ok and stage in self.stages):
                raise ValueError(f"evaluate.{name}.model: {ev.model!r} names no stage of this pipeline (use train.<entry>, "
                                 "tune or compress, and list that stage)")
        if "compress" in self.stages and self.compress.teacher not in self.train:
            raise ValueError(f"compress.teacher: {self.compress.teacher!r} is not a train entry "
                             f"(entries: {sorted(self.train) or 'none'})")
        if "compress" in self.stages and "train" not in self.stages:
            raise ValueError("compress needs its teacher from the train stage: list 'train' in stages")
        if self.serve is not None and "serve" in self.stages:
            for ep in ("classify", "generate", "complete", "match"):
                src = getattr(self.serve, ep)
                if src is None:
                    continue
                stage, _, entry = src.partition(".")
                ok = (stage == "train" and entry in self.train and "train" in self.stages) or \
                     (stage in ("tune", "compress") and not entry and stage in self.stages)
                if not ok:
                    raise ValueError(f"serve.{ep}: {src!r} names no stage of this pipeline (use train.<entry>, tune "
                                     "or compress, and list that stage)")
        return self


# --------------------------------------------------------------------------------------------------
# Sweeps (Ray Tune)
# --------------------------------------------------------------------------------------------------

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class DistributionSpec(Spec):
    """One search dimension, written as a one-key mapping: ``{loguniform: [1.0e-4, 1.0e-2]}``,
    ``{uniform: [0.9, 0.999]}``, ``{randint: [0, 20]}`` (high exclusive, as ``ray.tune.randint``),
    ``{choice: [cosine, linear]}`` (sampled) or ``{grid: [1, 2, 4]}`` (every value, each repeated
    ``search.num_samples`` times)."""

    choice: Optional[List[Any]] = Field(default=None, min_length=1)
    grid: Optional[List[Any]] = Field(default=None, min_length=1)
    uniform: Optional[List[float]] = Field(default=None, min_length=2, max_length=2)
    loguniform: Optional[List[float]] = Field(default=None, min_length=2, max_length=2)
    randint: Optional[List[int]] = Field(default=None, min_length=2, max_length=2)

    @field_validator("uniform", "loguniform", mode="before")
    @classmethod
    def _yaml_exponents(cls, v: Any) -> Any:
        """YAML 1.1 reads ``1e-4`` (no dot) as a string; bounds are numbers, so read it as one."""
        if isinstance(v, list):
            out = []
            for x in v:
                try:
                    out.append(float(x) if isinstance(x, str) else x)
                except ValueError:
                    out.append(x)
            return out
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "DistributionSpec":
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}; got {', '.join(given) or 'none'}")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: low must be < high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def args(self) -> List[Any]:
        return list(getattr(self, self.kind))


class SweepSearchSpec(Spec):
    """How trials are proposed. ``random``: grid dimensions enumerated, the others sampled;
    ``grid``: every dimension must be ``grid`` or ``choice`` (both enumerated); ``optuna``: TPE."""

    algorithm: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(default=4, ge=1, description="trials (with grid dimensions: repeats of the grid)")
    seed: Optional[int] = 0


class SweepSchedulerSpec(Spec):
    """Trial scheduling: ASHA early stopping on the sweep's metric, or none. Times are optimizer steps."""

    kind: Literal["asha", "none"] = "asha"
    grace_period: Optional[int] = Field(default=None, ge=1, description="steps before a trial can be stopped; "
                                        "default: the base's eval_every_n_steps")
    reduction_factor: float = Field(default=2.0, gt=1.0)
    brackets: int = Field(default=1, ge=1)


class ObjectiveSpec(Spec):
    metric: str
    mode: Literal["min", "max"]


class SweepSpec(Spec):
    """A Ray Tune sweep over a stage's spec: a base config, a search space keyed by dotted spec paths,
    the metric to optimise, the search algorithm and the scheduler."""

    name: str = Field(default="sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    stage: Literal["train", "compress"] = Field(default="train", description="what a trial runs: a training job "
                                               "(base: a TrainSpec YAML) or a compression job (base: a CompressSpec YAML)")
    base: str = Field(description="the stage YAML trials start from (relative to the working directory)")
    train: Dict[str, Any] = Field(default_factory=dict, description="nested values merged over the base "
                                  "before sampling (e.g. a shorter plan for the sweep); for stage compress, over "
                                  "the compression YAML (teacher_steps, train.steps, ...)")
    space: Dict[str, DistributionSpec] = Field(min_length=1, description="dotted spec path -> distribution")
    metric: Optional[str] = Field(default=None, description="reported metric to optimise; default: the task's "
                                  "validation metric (of the EMA weights when EMA is on); stage compress: the "
                                  "final variant's quality")
    mode: Optional[Literal["min", "max"]] = None
    objectives: List[ObjectiveSpec] = Field(default_factory=list, description="further objectives "
                                            "(multi-objective, optuna only), e.g. model_gflops/min")
    search: SweepSearchSpec = Field(default_factory=SweepSearchSpec)
    scheduler: SweepSchedulerSpec = Field(default_factory=SweepSchedulerSpec)
    max_concurrent_trials: int = Field(default=2, ge=1, description="upper bound; lowered so trials fit the cluster")
    trial_cpus: float = Field(default=0.01, gt=0.0, description="CPUs Tune reserves for a trial's driver "
                              "(its TorchTrainer workers reserve their own)")
    max_failures: int = Field(default=1, ge=0, description="Tune-level retries of a failed trial; a retry "
                              "resumes from the trial's last Train checkpoint")
    run_dir: str = Field(default="runs/sweeps", description="<run_dir>/<name>/: trials, results.json, best config")
    tracking: TrackingSpec = Field(default_factory=lambda: TrackingSpec(experiment="heygen_ray_sweeps"))
    ray: RaySpec = Field(default_factory=RaySpec)

    @field_validator("space", mode="before")
    @classmethod
    def _flatten_space(cls, v: Any) -> Any:
        """Nested sections (``optim: {lr: {loguniform: ...}}``, or a dotted override such as
        ``space.optim.lr={choice: [...]}``) -> dotted keys; a later entry for a path wins."""
        if not isinstance(v, Mapping):
            return v
        out: Dict[str, Any] = {}

        def walk(prefix: str, node: Mapping[str, Any]) -> None:
            for key, value in node.items():
                path = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(value, Mapping) and value and not (set(value) & set(DISTRIBUTIONS)):
                    walk(path, value)
                else:
                    out.pop(path, None)
                    out[path] = value

        walk("", v)
        return out

    @model_validator(mode="before")
    @classmethod
    def _compress_scheduler(cls, v: Any) -> Any:
        """A compress trial reports once, at its end: nothing for ASHA to stop early, so a compress
        sweep's scheduler kind defaults to none (an explicit asha is an error, below)."""
        if isinstance(v, Mapping) and v.get("stage") == "compress":
            sched = v.get("scheduler")
            if sched is None or (isinstance(sched, Mapping) and "kind" not in sched):
                v = {**v, "scheduler": {**(sched or {}), "kind": "none"}}
        return v

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        if self.stage == "compress" and self.scheduler.kind == "asha":
            raise ValueError("scheduler.kind: asha stops trials on their intermediate reports, and a compress trial "
                             "reports once, at its end; use scheduler.kind none (the default for stage compress)")
        if (self.metric is None) != (self.mode is None):
            raise ValueError("give metric and mode together (or neither, for the task's default)")
        if self.objectives and self.search.algorithm != "optuna":
            raise ValueError("objectives (multi-objective search) need search.algorithm='optuna'")
        for path, dist in self.space.items():
            if self.search.algorithm == "optuna" and dist.kind == "grid":
                raise ValueError(f"space.{path}: optuna does not enumerate grids; use choice")
            if self.search.algorithm == "grid" and dist.kind not in ("grid", "choice"):
                raise ValueError(f"space.{path}: search.algorithm='grid' needs grid or choice, got {dist.kind}")
        return self


# --------------------------------------------------------------------------------------------------
# Compression (prune -> distill -> quantize -> measure -> register)
# --------------------------------------------------------------------------------------------------


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
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _check(self) -> "CompressSpec":
        if self.train.task != "video_classification":
            raise ValueError(f"train.task: compression supports video_classification, not {self.train.task!r}")
        return self


SPEC_KINDS: Dict[str, Type[Spec]] = {
    "data": DataSpec,
    "train": TrainSpec,
    "synth": SynthSpec,
    "pipeline": PipelineSpec,
    "sweep": SweepSpec,
    "compress": CompressSpec,
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
SMOKE_OVERRIDES: Dict[str, List[str]] = {
    "data": ["synth.num_clips=32", "synth.output_dir=data/smoke", "synth.descriptions_per_clip=1"],
    "train": ["steps=12", "checkpoint_every_n_steps=6", "eval_every_n_steps=6", "log_every_n_steps=3",
              "batch_size=4", "data.synth.num_clips=32", "data.synth.output_dir=data/smoke", "schedule.warmup_steps=2",
              "data.video.cache=true"],  # decoded once: a new decoder pool every 3-step epoch cost more than the steps
    "compress": ["teacher_steps=24", "train.steps=12", "train.checkpoint_every_n_steps=12", "train.eval_every_n_steps=12",
                 "train.log_every_n_steps=4", "train.batch_size=4", "train.schedule.warmup_steps=2",
                 "train.data.synth.num_clips=48", "train.data.synth.output_dir=data/smoke_compress", "train.data.video.cache=true",
                 "quantize.calibration_batches=2", "measure.rounds=2", "measure.iters=3", "run_dir=runs/smoke"],
    "pipeline": ["smoke=true", "data.synth.num_clips=48", "data.synth.output_dir=data/smoke_pipeline",
                 "output_dir=runs/smoke_pipeline", "data.synth.descriptions_per_clip=1", "serve.keep_running=false"],
    "sweep": ["search.num_samples=4", "max_concurrent_trials=2", "train.steps=24", "train.eval_every_n_steps=6",
              "train.log_every_n_steps=6", "train.batch_size=8", "train.data.synth.num_clips=32",
              "train.data.synth.output_dir=data/smoke", "train.data.synth.descriptions_per_clip=1",
              "scheduler.grace_period=6", "run_dir=runs/smoke_sweeps"],
}
# A compression sweep (stage compress): 2 trials over the compression smoke sizes.
SMOKE_OVERRIDES["sweep_compress"] = ["search.num_samples=2", "run_dir=runs/smoke_sweeps"] + [
    f"train.{o}" for o in SMOKE_OVERRIDES["compress"] if not o.startswith("run_dir=")]


# --------------------------------------------------------------------------------------------------
# Serving (Ray Serve)
# --------------------------------------------------------------------------------------------------


SERVE_ENDPOINTS = ("classify", "generate", "complete", "match")


class ServeBatchSpec(Spec):
    """Dynamic batching (``@serve.batch``) of one endpoint. ``max_batch_size=1`` turns it off."""

    max_batch_size: int = Field(default=8, ge=1, le=512)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, le=5.0)


class ServeAutoscalingSpec(Spec):
    """Ray Serve ``autoscaling_config`` of one deployment (replaces ``num_replicas``)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0.0)
    upscale_delay_s: float = Field(default=5.0, ge=0.0)
    downscale_delay_s: float = Field(default=60.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> "ServeAutoscalingSpec":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} < min_replicas={self.min_replicas}")
        return self


class ServePreprocessSpec(Spec):
    """Preprocessing settings a model's model.json lacks (training records them as ``data_info``;
    these only fill gaps, e.g. for a model logged outside the training job)."""

    clip_frames: Optional[int] = Field(default=None, ge=1, le=512)
    height: Optional[int] = Field(default=None, ge=8, le=1024)
    width: Optional[int] = Field(default=None, ge=8, le=1024)
    resize: Literal["squash", "center_crop"] = "squash"
    tokenizer_dir: Optional[str] = None
    caption_tokens: Optional[int] = Field(default=None, ge=2, le=4096)
    label_names: Optional[List[str]] = None
    fps: int = Field(default=8, ge=1, le=120, description="frame rate of generated mp4/GIF files")


class ServeEndpointSpec(Spec):
    """One task endpoint: its model (``models:/name@alias``; null disables the endpoint), the
    variants a request may pick by multiplexed model id, batching and replicas."""

    model: Optional[str] = Field(default=None, description="models:/<name>@<alias> (or /<version>); null: endpoint off")
    variants: Dict[str, str] = Field(
        default_factory=dict, description="multiplexed model id -> a models:/ URI, a compression variant name "
        "registered under the same model (e.g. pruned_distilled_int8_dynamic), or a precision (fp32, bf16)")
    compile_int8: bool = Field(default=True, description="run int8 variants through torch.compile (Inductor)")
    batching: ServeBatchSpec = Field(default_factory=ServeBatchSpec)
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: Optional[ServeAutoscalingSpec] = None
    num_cpus: float = Field(default=0.25, gt=0.0, le=64.0)
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_models_per_replica: int = Field(default=3, ge=1)
    health_check_period_s: float = Field(default=10.0, gt=0.0)
    health_check_timeout_s: float = Field(default=30.0, gt=0.0)
    preprocess: ServePreprocessSpec = Field(default_factory=ServePreprocessSpec)

    @field_validator("model")
    @classmethod
    def _models_uri(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("models:/"):
            raise ValueError(f"expected a registry URI models:/<name>@<alias>, got {v!r}")
        return v

    @field_validator("variants")
    @classmethod
    def _variant_ids(cls, v: Dict[str, str]) -> Dict[str, str]:
        import re

        bad = [k for k in v if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", k) or k == "default"]
        if bad:
            raise ValueError(f"variant ids must match [A-Za-z0-9_.-]{{1,64}} and not be 'default': {bad}")
        return v


class ServeLimitsSpec(Spec):
    """Caps on what a request may carry (checked before any model work)."""

    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="JSON bodies")
    max_upload_bytes: int = Field(default=32 << 20, ge=1024, description="video uploads (multipart or raw)")
    max_frames: int = Field(default=3000, ge=1, description="frames in an uploaded/referenced video")
    max_prompt_chars: int = Field(default=1000, ge=1)
    max_tokens: int = Field(default=128, ge=1, description="cap on max_tokens of /v1/text/complete")
    max_captions: int = Field(default=32, ge=1, description="captions per /v1/match request")


class ServeSpec(Spec):
    """The Serve application: HTTP binding, the registry, one endpoint per task, limits, reload."""

    name: str = Field(default="heygen", pattern=r"^[A-Za-z0-9_-]+$", description="Serve application name")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    route_prefix: str = Field(default="/", pattern=r"^/")
    tracking_uri: Optional[str] = Field(default=None, description="MLflow tracking/registry URI; default MLFLOW_TRACKING_URI")
    classify: ServeEndpointSpec = Field(default_factory=ServeEndpointSpec)
    generate: ServeEndpointSpec = Field(default_factory=ServeEndpointSpec)
    complete: ServeEndpointSpec = Field(default_factory=ServeEndpointSpec)
    match: ServeEndpointSpec = Field(default_factory=ServeEndpointSpec)
    limits: ServeLimitsSpec = Field(default_factory=ServeLimitsSpec)
    allowed_uri_root: Optional[str] = Field(default=None, description="video URIs must lie under this; null: URIs refused")
    reload_period_s: Optional[float] = Field(default=None, gt=0.0, description="re-resolve aliases this often; null: only on POST /v1/admin/reload")
    ingress_num_cpus: float = Field(default=0.1, gt=0.0)
    ingress_replicas: int = Field(default=1, ge=1)
    access_log: bool = Field(default=False, description="Serve's per-request access log lines (CPU on every hop)")
    ray: RaySpec = Field(default_factory=RaySpec)

    def enabled(self) -> List[str]:
        """Endpoints with a model."""
        return [e for e in SERVE_ENDPOINTS if getattr(self, e).model is not None]

    @model_validator(mode="after")
    def _check(self) -> "ServeSpec":
        if not self.enabled():
            raise ValueError("no endpoint has a model: set at least one of classify/generate/complete/match.model")
        return self


SPEC_KINDS["serve"] = ServeSpec
