"""What the compression stage builds and hands on: a :class:`Variant` per model it makes and measures,
and the :class:`CompressResult` a run returns and writes as results.json."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional

INT8_SCHEMES = ("int8_static", "int8_dynamic", "int8_qat")
TEACHER = "teacher_fp32"  # the reference every variant is gated and sped up against


@dataclass
class Variant:
    """One model the stage builds, measures and registers.

    ``runnable`` is what is measured and timed: the eager module, a bf16 ``CastInputs``, or a
    compiled ``FrozenCompiled`` (int8 graphs included). ``source`` is the eager fp32 module the
    variant was made from, with its architecture: its FLOPs are the variant's, and the registry holds
    it for an int8 variant (whose int8 file goes beside it as a run artifact)."""

    name: str
    runnable: Any
    artifact: str  # the file the variant runs from (its size on disk is the variant's size)
    source: Any
    model_dir: Optional[str] = None  # its saved model directory (tracking.load_model), when it has one
    parent: Optional[str] = None  # the variant it was made from (None for the teacher)
    row: Dict[str, Any] = field(default_factory=dict)  # the measurements: its row of the report
    version: Optional[str] = None  # its registry version, once registered

    @property
    def architecture(self) -> Optional[Dict[str, Any]]:
        """The pruned widths (see heygen_ray.models.architecture); None when the shapes are the preset's."""
        from heygen_ray.models.architecture import ARCH_ATTR

        return getattr(self.source, ARCH_ATTR, None)

    @property
    def is_int8(self) -> bool:
        return self.name.endswith(INT8_SCHEMES)

    def registered_module(self) -> Any:
        """The loadable model the registry holds: the weights the variant runs from (the bf16 module
        of a bf16 cast), or for an int8 variant its fp32 source (model.json names the int8 file)."""
        from heygen_ray.compress.quantize import CastInputs

        if self.is_int8:
            return self.source
        return self.runnable.model if isinstance(self.runnable, CastInputs) else runnable_module(self.runnable)


@dataclass
class CompressResult:
    """What a compression run returns and writes to results.json (every field but ``results_path``)."""

    name: str
    model: str  # the registry name of the architecture (the teacher's)
    teacher_uri: str
    lineage: Dict[str, Any]  # the teacher: parent_model / parent_version / parent_uri, model_name, overrides
    recipe: str  # the spec's fingerprint
    calibration_fingerprint: str  # of the train batches used for calibration
    metric: str  # the gated quality metric
    prune: Dict[str, Any]  # the pruning report ({"method": "none"} when off)
    distill: Dict[str, Any]  # metrics / checkpoint_uri / seconds of the distillation run ({} when off)
    final_variant: str
    int8_vs_fp32_student: Dict[str, float]  # max_rel_error, top1_agreement
    variants: List[Dict[str, Any]]  # the report rows, one per variant, in measuring order
    exported_pt2: Dict[str, str]  # {variant: .pt2 path}
    alias: str
    alias_variant: Optional[str]  # the variant the alias went to (None: no candidate passed the gate)
    eval_rows: int
    mlflow_run_id: Optional[str]
    tracking_uri: Optional[str]
    versions: Dict[str, Optional[str]] = field(default_factory=dict)  # {variant: registry version}
    seconds: Optional[float] = None
    results_path: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompressResult":
        """From :meth:`to_dict` or a results.json (keys this class does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def row(self, variant: str) -> Dict[str, Any]:
        """The report row of ``variant``."""
        for r in self.variants:
            if r["variant"] == variant:
                return r
        raise KeyError(f"no variant {variant!r} in {[r['variant'] for r in self.variants]}")


def runnable_module(fn: Any) -> Any:
    """The eager module inside a variant's runnable (a bf16 cast or a compiled wrapper unwrapped)."""
    from heygen_ray.compress.quantize import CastInputs, FrozenCompiled

    while isinstance(fn, (CastInputs, FrozenCompiled)):
        fn = fn.model if isinstance(fn, CastInputs) else fn.inner
    return fn
