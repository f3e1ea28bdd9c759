"""Validated specs for every stage: YAML + dotted overrides -> one pydantic spec.

Layout (each module imports only the ones above it):
* ``base``: the :class:`Spec` base, :class:`ConfigError`, YAML loading, dotted overrides, error
  messages with field paths, and the specs several stages embed (:class:`RaySpec`, :class:`TrackingSpec`);
* one module per stage: ``data``, ``train``, ``tune`` (sweeps), ``compress``, ``serve``, ``pipeline``;
* ``kinds``: :data:`SPEC_KINDS` (configs/<kind>/ folder -> spec class), :func:`spec_kind_for` and the
  ``--smoke-test`` sizes (:data:`SMOKE_OVERRIDES`).

Every public name is re-exported here: ``from heygen_ray.config import TrainSpec``.
Stage specs are named ``*Spec`` so they never shadow Ray's ``ScalingConfig``/``RunConfig``/``DataConfig``.
"""

from __future__ import annotations

from heygen_ray.config.base import (
    ConfigError,
    RaySpec,
    Spec,
    TrackingSpec,
    apply_overrides,
    load_spec,
    load_yaml,
    parse_override,
    set_path,
    validate_spec,
)
from heygen_ray.config.compress import (
    REFERENCE_VARIANTS,
    CompressSpec,
    DistillSpec,
    GateSpec,
    MeasureSpec,
    PruneSpec,
    QuantizeSpec,
)
from heygen_ray.config.data import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    DataSpec,
    ManifestColumnsSpec,
    SplitSpec,
    SynthSpec,
    TextDataSpec,
    VideoDataSpec,
)
from heygen_ray.config.kinds import SMOKE_OVERRIDES, SPEC_KINDS, spec_kind_for
from heygen_ray.config.pipeline import (
    PIPELINE_STAGES,
    ChampionGateSpec,
    PipelineCompressSpec,
    PipelineEvaluateSpec,
    PipelineServeSpec,
    PipelineSpec,
    PipelineTrainSpec,
    StageRefSpec,
)
from heygen_ray.config.serve import (
    SERVE_ENDPOINTS,
    ServeAuthSpec,
    ServeAutoscalingSpec,
    ServeBatchSpec,
    ServeEndpointSpec,
    ServeLimitsSpec,
    ServePreprocessSpec,
    ServeSpec,
)
from heygen_ray.config.train import (
    DiscriminatorSpec,
    EMASpec,
    FaultSpec,
    InitFromSpec,
    JudgeSpec,
    MatchingLossSpec,
    ModelSpec,
    OptimSpec,
    ScalingSpec,
    ScheduleSpec,
    TrainSpec,
    VideoLossSpec,
)
from heygen_ray.config.tune import (
    DISTRIBUTIONS,
    DistributionSpec,
    ObjectiveSpec,
    SweepSchedulerSpec,
    SweepSearchSpec,
    SweepSpec,
)

__all__ = [
    # base
    "ConfigError", "RaySpec", "Spec", "TrackingSpec", "apply_overrides", "load_spec", "load_yaml", "parse_override",
    "set_path", "validate_spec",
    # data
    "COLORS", "DIRECTIONS", "SHAPES", "SPEEDS", "DataSpec", "ManifestColumnsSpec", "SplitSpec", "SynthSpec",
    "TextDataSpec", "VideoDataSpec",
    # train
    "DiscriminatorSpec", "EMASpec", "FaultSpec", "InitFromSpec", "JudgeSpec", "MatchingLossSpec", "ModelSpec",
    "OptimSpec", "ScalingSpec", "ScheduleSpec", "TrainSpec", "VideoLossSpec",
    # tune
    "DISTRIBUTIONS", "DistributionSpec", "ObjectiveSpec", "SweepSchedulerSpec", "SweepSearchSpec", "SweepSpec",
    # compress
    "REFERENCE_VARIANTS", "CompressSpec", "DistillSpec", "GateSpec", "MeasureSpec", "PruneSpec", "QuantizeSpec",
    # serve
    "SERVE_ENDPOINTS", "ServeAuthSpec", "ServeAutoscalingSpec", "ServeBatchSpec", "ServeEndpointSpec", "ServeLimitsSpec",
    "ServePreprocessSpec", "ServeSpec",
    # pipeline
    "PIPELINE_STAGES", "ChampionGateSpec", "PipelineCompressSpec", "PipelineEvaluateSpec", "PipelineServeSpec",
    "PipelineSpec", "PipelineTrainSpec", "StageRefSpec",
    # kinds
    "SMOKE_OVERRIDES", "SPEC_KINDS", "spec_kind_for",
]
