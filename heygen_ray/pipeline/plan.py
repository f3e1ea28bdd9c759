"""Planning a pipeline (no Ray): every stage unit resolved and validated up front, its content key,
the ledger that records each unit's key, status and outputs, and the --force closure."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from heygen_ray import fsutil
from heygen_ray.config import (
    SMOKE_OVERRIDES,
    CompressSpec,
    ConfigError,
    DataSpec,
    PipelineSpec,
    Spec,
    StageRefSpec,
    SweepSpec,
    TrainSpec,
    load_yaml,
    parse_override,
    set_path,
    validate_spec,
)
from heygen_ray.uris import is_model_uri, model_uri, parse_model_uri

LEDGER_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Planning (no Ray): every stage spec resolved and validated up front
# --------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One ledger entry: a stage (or one training of the train stage) with its resolved spec."""

    name: str  # data | train.<entry> | tune | compress | serve
    stage: str
    spec: Any  # the validated stage spec (DataSpec, TrainSpec, SweepSpec, CompressSpec) or a dict (serve)
    deps: List[str] = field(default_factory=list)
    run_dir: str = ""


def _stage_dict(ref: StageRefSpec, where: str, smoke_key: Optional[str], smoke: bool) -> Dict[str, Any]:
    try:
        d = load_yaml(ref.config)
    except ConfigError as err:
        raise ConfigError(f"{where}.config: {err}") from None
    for path, value in ref.overrides.items():
        set_path(d, path, value)
    if smoke and smoke_key:
        for text in SMOKE_OVERRIDES[smoke_key]:
            path, value = parse_override(text)
            set_path(d, ".".join(path), value)
    if smoke:
        for path, value in ref.smoke_overrides.items():
            set_path(d, path, value)
    return d


def _validated(cls, d: Dict[str, Any], where: str, ref: StageRefSpec):
    shown = f"pipeline {where} ({ref.config}" + (f" + overrides {sorted(ref.overrides)})" if ref.overrides else ")")
    return validate_spec(cls, d, source=shown)


def model_refs(spec: TrainSpec) -> List[str]:
    """The registered model names a training reads (``models:/NAME@...`` or ``models:/NAME/...`` in
    model.init_from.uri and judge.model)."""
    uris = [spec.model.init_from.uri if spec.model.init_from else None, spec.judge.model if spec.judge else None]
    names = []
    for uri in filter(None, uris):
        if is_model_uri(uri):
            names.append(parse_model_uri(uri).name)
    return names


def endpoint_section(d: Dict[str, Any], endpoint: str) -> Dict[str, Any]:
    """The serve config's section of ``endpoint`` (created when absent or null), to fill in place."""
    section = d.get(endpoint) or {}
    d[endpoint] = section
    return section


def plan_pipeline(spec: PipelineSpec) -> List[Unit]:
    """The units in run order, every stage spec validated. The pipeline owns the data set (each
    stage's ``data.synth`` and manifest become the pipeline's), the run folders
    (``<output_dir>/<stage>/``) and tracking (one store, runs nested under the stage's run).
    The spec's ``storage`` (when set) becomes the storage root those folders resolve under."""
    from heygen_ray import runtime

    if spec.storage:
        runtime.use_storage(spec.storage)
    out_dir = fsutil.absolute(spec.output_dir)
    synth = spec.data.synth.to_dict() if spec.data.synth is not None else None
    manifest = spec.data.video.manifest
    units: List[Unit] = []

    def own_data(d: Dict[str, Any]) -> None:
        data = d.setdefault("data", {})
        if synth is not None:
            data["synth"] = dict(synth)
        video = data.setdefault("video", {})
        if manifest is not None or synth is not None:
            video.pop("manifest", None)
            if manifest is not None:
                video["manifest"] = manifest
        text = data.setdefault("text", {})
        for k in ("corpus", "tokenizer_dir"):
            if getattr(spec.data.text, k, None) is not None:
                text[k] = getattr(spec.data.text, k)

    if "data" in spec.stages:
        units.append(Unit("data", "data", spec.data, [], os.path.join(out_dir, "data")))
    if "train" in spec.stages:
        specs: Dict[str, TrainSpec] = {}
        for entry, ref in spec.train.items():
            where = f"train.{entry}"
            d = _stage_dict(ref, where, "train", spec.smoke)
            own_data(d)
            d["name"] = entry
            d["run_dir"] = os.path.join(out_dir, "train")
            specs[entry] = _validated(TrainSpec, d, where, ref)
        registers = {s.tracking.registered_model_name: e for e, s in specs.items() if s.tracking.registered_model_name}
        order = list(specs)
        for entry, tspec in specs.items():
            deps = ["data"] if "data" in spec.stages else []
            for used in model_refs(tspec):  # a warm start or a judge from another entry's model
                source = registers.get(used)
                if source is None or source == entry:
                    continue
                if order.index(source) > order.index(entry):
                    raise ConfigError(f"pipeline train.{entry}: it uses the model {used!r} of train.{source}, "
                                      "which comes later: list train entries in the order they depend on each other")
                deps.append(f"train.{source}")
            units.append(Unit(f"train.{entry}", "train", tspec, deps, os.path.join(out_dir, "train", entry)))
    if "tune" in spec.stages:
        kind = (load_yaml(spec.tune.config) if os.path.isfile(spec.tune.config) else {}).get("stage", "train")
        d = _stage_dict(spec.tune, "tune", "sweep_compress" if kind == "compress" else "sweep", spec.smoke)
        over = d.setdefault("train", {})  # merged over the base: a training spec, or a compression spec's `train`
        own_data(over.setdefault("train", {}) if d.get("stage") == "compress" else over)
        d["run_dir"] = os.path.join(out_dir, "tune")
        sweep = _validated(SweepSpec, d, "tune", spec.tune)
        from heygen_ray.tune.sweep import plan_sweep

        try:
            plan_sweep(sweep)  # the base, the space and the metric, checked before anything runs
        except ConfigError as err:
            raise ConfigError(f"pipeline tune ({spec.tune.config}): {err}") from None
        units.append(Unit("tune", "tune", sweep, ["data"] if "data" in spec.stages else [],
                          os.path.join(out_dir, "tune", sweep.name)))
    if "compress" in spec.stages:
        ref = spec.compress
        d = _stage_dict(ref, "compress", "compress", spec.smoke)
        own_data(d.setdefault("train", {}))
        d["run_dir"] = os.path.join(out_dir, "compress")
        d.setdefault("gate", {})["alias"] = spec.champion_alias
        d["teacher"] = None  # set to the teacher's registered version when the stage runs
        cspec = _validated(CompressSpec, d, "compress", ref)
        units.append(Unit("compress", "compress", cspec, [f"train.{ref.teacher}"], os.path.join(out_dir, "compress", cspec.name)))
    if "evaluate" in spec.stages:
        for name, ev in spec.evaluate.items():
            d = spec.data.to_dict()
            overrides = dict(ev.data_overrides)
            if d.get("synth") and any(k.startswith("synth.") for k in overrides):
                # other clips: their own folder (beside the pipeline's unless named), manifest and corpus
                overrides.setdefault("synth.output_dir", f"{spec.data.synth.output_dir.rstrip('/')}_{name}")
                if spec.smoke:  # smoke sizes: no more clips than the pipeline's own data
                    overrides["synth.num_clips"] = min(int(overrides.get("synth.num_clips", 10 ** 9)),
                                                       spec.data.synth.num_clips)
            if "synth.output_dir" in overrides:
                d["video"].pop("manifest", None)
                d["text"].pop("corpus", None)
            for path, value in overrides.items():
                set_path(d, path, value)
            data = validate_spec(DataSpec, d, source=f"pipeline evaluate.{name}.data_overrides")
            units.append(Unit(f"evaluate.{name}", "evaluate", data, [ev.model], os.path.join(out_dir, "evaluate", name)))
    if "serve" in spec.stages:
        ref = spec.serve
        d = _stage_dict(ref, "serve", None, spec.smoke)
        deps = [src for src in (ref.classify, ref.generate, ref.complete, ref.match) if src]
        from heygen_ray.config import SERVE_ENDPOINTS, ServeSpec

        check = json.loads(json.dumps(d))  # the models come from the stages: validate the rest now
        for ep in SERVE_ENDPOINTS:
            endpoint_section(check, ep)["model"] = model_uri(ep, alias=spec.champion_alias) if getattr(ref, ep) else None
        _validated(ServeSpec, check, "serve", ref)
        units.append(Unit("serve", "serve", d, sorted(set(deps)), os.path.join(out_dir, "serve")))
    return units


# --------------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------------


def code_version() -> str:
    """A hash of the package's source files (a job's working dir has no git metadata)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # heygen_ray/
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = os.path.join(dirpath, fn)
                h.update(os.path.relpath(p, root).encode())
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def data_fingerprint(manifest: Optional[str]) -> Optional[str]:
    """sha256 of the manifest file (it lists every clip's sha256): the data's identity."""
    if not manifest or not fsutil.exists(manifest):
        return None
    return hashlib.sha256(fsutil.read_bytes(manifest)).hexdigest()[:16]


def unit_key(unit: Unit, input_keys: Mapping[str, str], data_fp: Optional[str], code: str) -> str:
    spec = unit.spec.to_dict() if isinstance(unit.spec, Spec) else unit.spec
    blob = json.dumps({"unit": unit.name, "spec": spec, "inputs": dict(sorted(input_keys.items())),
                       "data": data_fp, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Ledger:
    """``<output_dir>/ledger.json``: {unit: {key, status, outputs, seconds, finished_at, ...}}."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: Dict[str, Dict[str, Any]] = {}
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            if data.get("version") == LEDGER_VERSION:
                self.entries = data.get("units", {})

    def get(self, name: str) -> Optional[Dict[str, Any]]:
        return self.entries.get(name)

    def record(self, name: str, **entry: Any) -> None:
        self.entries[name] = {**self.entries.get(name, {}), **entry, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"version": LEDGER_VERSION, "units": self.entries}, f, indent=2, default=str)
        os.replace(tmp, self.path)


def downstream(units: Sequence[Unit], forced: Iterable[str]) -> List[str]:
    """The units named by ``forced`` (a stage such as ``train`` or a unit such as
    ``train.text_to_video``) and every unit that consumes one of them."""
    names = {u.name for u in units}
    stages = {u.stage for u in units}
    out: set = set()
    for f in forced:
        if f not in names and f not in stages:
            raise ConfigError(f"--force {f}: not a stage of this pipeline (stages: {', '.join(u.name for u in units)})")
        out |= {u.name for u in units if u.name == f or u.stage == f}
    changed = True
    while changed:
        changed = False
        for u in units:
            if u.name not in out and any(d in out for d in u.deps):
                out.add(u.name)
                changed = True
    return [u.name for u in units if u.name in out]
