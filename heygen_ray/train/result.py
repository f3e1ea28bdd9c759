"""What a training job hands the next stage: :class:`TrainResult` (JSON-able, written as results.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional


@dataclass
class TrainResult:
    """One finished training job. ``metrics``: the last report's numbers (``val_*`` from the final
    validation); ``checkpoint_uri``: the final checkpoint (what a resume or ``load_final_weights``
    reads); ``model_uri`` / ``registered_model_name`` / ``model_version``: the logged model when the
    run is tracked (None otherwise); ``extra``: anything else the task returned (text samples, the
    folders of generated clips)."""

    name: str
    task: str
    model: str
    run_dir: str
    seconds: float
    step: int = 0
    resumed_from: Optional[int] = None
    precision: Optional[str] = None
    precision_reason: Optional[str] = None
    checkpoint_uri: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    val_history: Dict[str, List[Any]] = field(default_factory=dict)
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    model_uri: Optional[str] = None
    registered_model_name: Optional[str] = None
    model_version: Optional[str] = None
    results_path: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The flat dict written to results.json (``extra``'s keys at the top level)."""
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainResult":
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})
