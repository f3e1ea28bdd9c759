"""The sweep stage's specs (Ray Tune): the search space, the search algorithm, the scheduler."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Mapping, Optional

from pydantic import Field, field_validator, model_validator

from heygen_ray.config.base import RaySpec, Spec, TrackingSpec, storage_field

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
    storage: Optional[str] = storage_field()
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
