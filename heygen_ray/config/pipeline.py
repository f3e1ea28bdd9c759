"""The end-to-end pipeline's spec: which stages run, each stage's YAML and overrides, the gates."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import Field, model_validator

from heygen_ray.config.base import RaySpec, Spec, TrackingSpec, storage_field
from heygen_ray.config.data import DataSpec

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
    keep_running: Optional[bool] = Field(default=None, description="leave Serve running when the pipeline ends "
                                         "(make stop / heygen-ray serve stop); false: shut it down after the smoke "
                                         "requests; null (default): running, except at --smoke-test sizes")


class PipelineSpec(Spec):
    """The end-to-end job: data -> train -> tune -> compress -> serve. Only the stages listed in
    ``stages`` run, in that order. Each stage's outcome is kept in ``<output_dir>/ledger.json`` under a
    content key (its resolved spec, its inputs, the data fingerprint, the code version): a stage whose
    key is unchanged is skipped; an unfinished training resumes from its checkpoint."""

    name: str = Field(default="quickstart", pattern=r"^[A-Za-z0-9_.-]+$")
    stages: List[Literal["data", "train", "tune", "compress", "evaluate", "serve"]] = Field(default_factory=lambda: ["data"], min_length=1)
    output_dir: str = "runs/quickstart"
    storage: Optional[str] = storage_field()
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
