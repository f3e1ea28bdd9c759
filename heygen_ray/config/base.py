"""The machinery every stage spec shares: the :class:`Spec` base, :class:`ConfigError`, YAML loading,
dotted overrides, field-path error messages, and the small specs several stages embed
(:class:`RaySpec`, :class:`TrackingSpec`).

Conventions:
* Every spec is a pydantic model with ``extra="forbid"`` and ``strict=True``: a misspelled key, a
  float where an int is wanted ("8.0" from a sweep sampler) or a string where a number is wanted
  fails before anything runs.
* Errors are :class:`ConfigError` and name the source (the YAML file or the override) and the dotted
  field path, with a "did you mean" for misspelled keys.
* Specs cross process boundaries as plain dicts (``spec.to_dict()``) and are re-validated on arrival
  (``SpecCls.from_dict(d)``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

S = TypeVar("S", bound="Spec")


class ConfigError(ValueError):
    """A configuration problem, reported before anything runs. The message names where and what."""


def storage_field() -> Any:
    """The ``storage`` field of the stage specs a job loads: where everything the job writes goes."""
    return Field(default=None, description="the storage root (a local or shared directory) that relative run, output "
                 "and data paths resolve under; default $HEYGEN_RAY_STORAGE, else the current directory")


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
# Shared pieces: specs that several stages embed
# --------------------------------------------------------------------------------------------------


class RaySpec(Spec):
    """How a job reaches Ray. ``address=None`` starts a local Ray (or joins the one a job runs in)."""

    address: Optional[str] = None
    num_cpus: Optional[int] = Field(default=None, ge=1, description="only when starting a local Ray")
    object_store_memory_mb: Optional[int] = Field(default=None, ge=64)
    log_to_driver: bool = Field(default=True, description="print the Ray workers' logs on this console; off: they "
                                "stay in the session's log folder (printed at the end) and the console shows progress")


class TrackingSpec(Spec):
    """Where runs go. ``tracking_uri=None``: ``MLFLOW_TRACKING_URI`` if set, else a sqlite database and
    an artifact folder under the job's run directory (absolute paths: Train workers change directory)."""

    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment: str = "heygen_ray"
    registered_model_name: Optional[str] = Field(default=None, description="register the final model under this name")
    parent_run_id: Optional[str] = None
    tags: Dict[str, str] = Field(default_factory=dict)
