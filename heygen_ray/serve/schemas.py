"""Request bodies of the Serve app (pydantic, closed and strict) and the limit checks on them.

Static rules live on the models (types, required fields, non-empty prompts); the configurable caps
(`ServeLimitsSpec`: prompt length, max_tokens, captions) are checked by :func:`check_limits`, so one
spec drives them. Every failure is a :class:`BadInputError` naming the field, which the ingress turns
into a 4xx with ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (FastAPI's own shape).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Sequence, Type, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from heygen_ray.config import ServeLimitsSpec

M = TypeVar("M", bound=BaseModel)


class BadInputError(ValueError):
    """A request the server refuses: ``status`` (4xx), the offending ``field`` and a message.
    Raised in the ingress or in a model replica (decoding); it pickles (its args are plain)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(field, message, status)
        self.field, self.message, self.status = field, message, status

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def detail(self) -> List[Dict[str, Any]]:
        loc = ["body", *self.field.split(".")] if self.field not in ("", "body") else ["body"]
        return [{"loc": loc, "msg": self.message, "type": "value_error"}]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VideoURIRequest(_Body):
    """``/v1/videos/classify`` as JSON: a video by URI (under the configured allowed root)."""

    uri: str = Field(min_length=1, max_length=4096)


class GenerateRequest(_Body):
    prompt: str = Field(min_length=1)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    format: Literal["mp4", "gif"] = Field(default="mp4", description="gif: JSON with a base64 GIF")


class CompleteRequest(_Body):
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="0 (or < 0.001): greedy")
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)


class MatchRequest(_Body):
    """``/v1/match`` as JSON: a video by URI and the captions to score against it."""

    uri: str = Field(min_length=1, max_length=4096)
    captions: List[str] = Field(min_length=1)


def validate_body(model: Type[M], data: Any) -> M:
    """``data`` (parsed JSON) -> ``model``; the first error becomes a BadInputError naming its field."""
    if not isinstance(data, dict):
        raise BadInputError("", f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"])
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = f"unknown field; allowed: {', '.join(model.model_fields)}"
            elif "input" in e and not isinstance(e["input"], (dict, list)) and e["type"] != "missing":
                msg += f" (got {type(e['input']).__name__})"
            problems.append((field, msg))
        field, msg = problems[0]
        if len(problems) > 1:
            msg += "; also " + "; ".join(f"{f}: {m}" for f, m in problems[1:])
        raise BadInputError(field, msg) from None


def check_prompt(prompt: str, limits: ServeLimitsSpec, field: str = "prompt") -> None:
    if not prompt.strip():
        raise BadInputError(field, "must not be blank")
    if len(prompt) > limits.max_prompt_chars:
        raise BadInputError(field, f"{len(prompt)} characters > the limit of {limits.max_prompt_chars}")


def check_captions(captions: Sequence[str], limits: ServeLimitsSpec) -> None:
    if not captions:
        raise BadInputError("captions", "at least one caption is required")
    if len(captions) > limits.max_captions:
        raise BadInputError("captions", f"{len(captions)} captions > the limit of {limits.max_captions}")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise BadInputError(f"captions.{i}", f"must be a string, got {type(c).__name__}")
        check_prompt(c, limits, f"captions.{i}")


def check_complete(req: CompleteRequest, limits: ServeLimitsSpec) -> None:
    check_prompt(req.prompt, limits)
    if req.max_tokens > limits.max_tokens:
        raise BadInputError("max_tokens", f"{req.max_tokens} > the limit of {limits.max_tokens}")
