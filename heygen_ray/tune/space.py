"""Search spaces over any stage's spec, checked before a single trial starts.

    space = SearchSpace(TrainSpec, base_dict, {"optim.lr": {"loguniform": [1e-4, 1e-2]},
                                               "schedule.kind": {"choice": ["cosine", "linear"]},
                                               "model.overrides.num_layers": {"randint": [1, 4]}})
    space.validate()                       # ConfigError naming the path, or nothing
    tune_space = space.to_tune()           # {"optim.lr": tune.loguniform(...), ...}
    spec = space.build({"optim.lr": 3e-3, "schedule.kind": "linear", "model.overrides.num_layers": 2})

Paths are checked against the pydantic fields of the spec class: nested specs are walked, a
dict-typed field (``model.overrides``) accepts any key below it, anything else must end the path.
Samples are checked by building the spec with each distribution's extreme values (the bounds of
``uniform``/``loguniform`` as floats, ``randint``'s lowest and highest integers) and every ``choice``/
``grid`` value, one dimension at a time over the base: a float drawn for an int field, a value out
of a field's range or one that breaks a cross-field rule fails here. Each trial re-validates its own
combination on arrival (``build``).

Nothing here knows about training: the compression stage sweeps its spec with the same code. Only
``to_tune`` imports Ray.
"""

from __future__ import annotations

import copy
import difflib
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Type, Union

from pydantic import BaseModel

from heygen_ray import config
from heygen_ray.config import ConfigError, DistributionSpec, Spec, validate_spec


@dataclass(frozen=True)
class Dimension:
    """One swept path and its distribution."""

    path: str
    kind: str  # choice | grid | uniform | loguniform | randint
    args: tuple

    @property
    def is_numeric_range(self) -> bool:
        return self.kind in ("uniform", "loguniform", "randint")

    def candidates(self) -> List[Any]:
        """The values a spec is built with to check this dimension (extremes, or every value)."""
        if self.kind in ("uniform", "loguniform"):
            return [float(self.args[0]), float(self.args[1])]
        if self.kind == "randint":  # high is exclusive
            return [int(self.args[0]), int(self.args[1]) - 1]
        return list(self.args)

    def describe(self, value: Any) -> str:
        if self.kind in ("uniform", "loguniform", "randint"):
            which = "lower" if value == self.candidates()[0] else "upper"
            return f"the {which} end of {self.kind}{list(self.args)}"
        return f"the {self.kind} value {value!r}"


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> Any:
    """Optional[X] -> X (a Union of several non-None types is returned unchanged)."""
    origin = typing.get_origin(annotation)
    if origin is Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_mapping(annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (list, tuple, set, frozenset)


def check_path(spec_cls: Type[BaseModel], path: str, *, where: str = "space") -> None:
    """Raise ConfigError unless ``path`` names a settable field of ``spec_cls`` (or a key under a
    dict-typed field)."""
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"{where}.{path}: empty component in the dotted path")
    cls: Any = spec_cls
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "<top level>"
        fields = cls.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}.{path}: {cls.__name__} has no field {part!r} at {here}{hint}; "
                f"fields there: {', '.join(sorted(fields))}"
            )
        annotation = _unwrap_optional(fields[part].annotation)
        rest = parts[depth + 1:]
        if not rest:
            return
        if _is_model(annotation):
            cls = annotation
            continue
        if _is_mapping(annotation):
            return  # free-form mapping (e.g. model.overrides): any key below it
        kind = "a list (sweep it whole with choice/grid)" if _is_sequence(annotation) else f"a value ({annotation})"
        raise ConfigError(f"{where}.{path}: {'.'.join(parts[: depth + 1])} is {kind}, not a section with fields")


def get_path(data: Mapping[str, Any], path: str, default: Any = None) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_path(data: Dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict to a copy of ``value`` (dicts created on the way)."""
    config.set_path(data, path, copy.deepcopy(value))


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``over`` replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------------


def _plain_value(value: Any) -> Any:
    """numpy scalars (Tune samples them) -> Python; a float stays a float (an int field then fails)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


class SearchSpace:
    """``{dotted path: distribution}`` over ``spec_cls``, starting from the ``base`` dict."""

    def __init__(self, spec_cls: Type[Spec], base: Mapping[str, Any],
                 space: Mapping[str, Union[DistributionSpec, Mapping[str, Any]]], *, where: str = "space") -> None:
        if not space:
            raise ConfigError(f"{where}: the search space is empty")
        self.spec_cls = spec_cls
        self.base = copy.deepcopy(dict(base))
        self.where = where
        dims = []
        for path, dist in space.items():
            if not isinstance(dist, DistributionSpec):
                dist = DistributionSpec.from_dict(dist, source=f"{where}.{path}")
            check_path(spec_cls, path, where=where)
            dims.append(Dimension(path, dist.kind, tuple(dist.args)))
        paths = [d.path for d in dims]
        for a in paths:
            for b in paths:
                if a != b and b.startswith(a + "."):
                    raise ConfigError(f"{where}: {a} and {b} overlap (one is inside the other)")
        self.dimensions: List[Dimension] = dims

    @property
    def paths(self) -> List[str]:
        return [d.path for d in self.dimensions]

    def dimension(self, path: str) -> Dimension:
        return next(d for d in self.dimensions if d.path == path)

    def apply(self, values: Mapping[str, Any]) -> Dict[str, Any]:
        """The base dict with ``values`` (path -> value) set."""
        unknown = sorted(set(values) - set(self.paths))
        if unknown:
            raise ConfigError(f"{self.where}: values for paths outside the space: {', '.join(unknown)}")
        out = copy.deepcopy(self.base)
        for path, value in values.items():
            set_path(out, path, _plain_value(value))
        return out

    def build(self, values: Mapping[str, Any], *, source: Optional[str] = None) -> Spec:
        """Validate one combination of values (what a trial does on arrival)."""
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        return validate_spec(self.spec_cls, self.apply(values), source=source or f"{self.where} sample [{shown}]")

    def base_spec(self) -> Spec:
        return validate_spec(self.spec_cls, self.base, source=f"{self.where} base")

    def samples_to_check(self) -> List[Dict[str, Any]]:
        """One {path: value} per candidate value of each dimension (others stay at the base)."""
        return [{d.path: v} for d in self.dimensions for v in d.candidates()]

    def validate(self) -> None:
        """Raise ConfigError on the first candidate value that does not build a valid spec."""
        self.base_spec()
        for d in self.dimensions:
            for value in d.candidates():
                try:
                    self.build({d.path: value}, source=f"{self.where}.{d.path}={value!r}")
                except ConfigError as err:
                    raise ConfigError(
                        f"{self.where}.{d.path}: {d.describe(value)} is invalid for {self.spec_cls.__name__}:\n{err}"
                    ) from None

    # -- Ray Tune ---------------------------------------------------------------------------------
    def to_tune(self, *, enumerate_choices: bool = False) -> Dict[str, Any]:
        """{path: ray.tune domain}. ``enumerate_choices`` turns ``choice`` into a grid (grid search)."""
        from ray import tune

        out: Dict[str, Any] = {}
        for d in self.dimensions:
            a = d.args
            if d.kind == "grid" or (d.kind == "choice" and enumerate_choices):
                out[d.path] = tune.grid_search(list(a))
            elif d.kind == "choice":
                out[d.path] = tune.choice(list(a))
            elif d.kind == "uniform":
                out[d.path] = tune.uniform(float(a[0]), float(a[1]))
            elif d.kind == "loguniform":
                out[d.path] = tune.loguniform(float(a[0]), float(a[1]))
            elif d.kind == "randint":
                out[d.path] = tune.randint(int(a[0]), int(a[1]))
            else:  # pragma: no cover - DistributionSpec admits nothing else
                raise ConfigError(f"{self.where}.{d.path}: unknown distribution {d.kind}")
        return out

    def grid_size(self, *, enumerate_choices: bool = False) -> int:
        n = 1
        for d in self.dimensions:
            if d.kind == "grid" or (d.kind == "choice" and enumerate_choices):
                n *= len(d.args)
        return n


def non_primitive_choices(space: SearchSpace) -> List[str]:
    """Paths whose choice/grid values are not plain scalars (Optuna's categoricals take only those)."""
    out = []
    for d in space.dimensions:
        if d.kind in ("choice", "grid") and any(not isinstance(v, (str, int, float, bool, type(None))) for v in d.args):
            out.append(d.path)
    return out


def plain_values(values: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _plain_value(v) for k, v in values.items()}


__all__ = ["Dimension", "SearchSpace", "check_path", "get_path", "merge", "non_primitive_choices", "plain_values", "set_path"]
