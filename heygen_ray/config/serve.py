"""The serving stage's specs (Ray Serve): the HTTP app, one endpoint per task, batching, limits."""

from __future__ import annotations

import re
from typing import Dict, List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from heygen_ray.config.base import RaySpec, Spec
from heygen_ray.uris import is_model_uri

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
        if v is not None and not is_model_uri(v):
            raise ValueError(f"expected a registry URI models:/<name>@<alias>, got {v!r}")
        return v

    @field_validator("variants")
    @classmethod
    def _variant_ids(cls, v: Dict[str, str]) -> Dict[str, str]:
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


class ServeAuthSpec(Spec):
    """Bearer tokens (``Authorization: Bearer <token>``), read by each ingress replica from a file (a
    mounted Kubernetes Secret, say) or else an environment variable of the replica's process, and
    compared in constant time. The admin token guards ``POST /v1/admin/*``: without one configured,
    the admin endpoints are off (403). ``inference: true`` makes the model endpoints and
    ``/v1/models`` require the inference token (or the admin token). ``/healthz`` stays open."""

    admin_token_file: Optional[str] = None
    admin_token_env: str = Field(default="HEYGEN_RAY_ADMIN_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    inference: bool = Field(default=False, description="model endpoints require a token too")
    inference_token_file: Optional[str] = None
    inference_token_env: str = Field(default="HEYGEN_RAY_INFERENCE_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    reload_period_s: Optional[float] = Field(
        default=None, gt=0.0, description="re-resolve aliases this often; null: only on POST /v1/admin/reload")
    ingress_num_cpus: float = Field(default=0.1, gt=0.0)
    ingress_replicas: int = Field(default=1, ge=1)
    access_log: bool = Field(default=False, description="Serve's per-request access log lines (CPU on every hop)")
    auth: ServeAuthSpec = Field(default_factory=ServeAuthSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    def enabled(self) -> List[str]:
        """Endpoints with a model."""
        return [e for e in SERVE_ENDPOINTS if getattr(self, e).model is not None]

    @model_validator(mode="after")
    def _check(self) -> "ServeSpec":
        if not self.enabled():
            raise ValueError("no endpoint has a model: set at least one of classify/generate/complete/match.model")
        return self
