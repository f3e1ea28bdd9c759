"""Search spaces: paths checked against the spec's fields, samples checked by building the spec,
conversion to Ray Tune domains, and the sweep spec's own rules; the tune package's layering, the train
trial's spec, stop requests and the sweep's result (no Ray cluster needed)."""

import os

import numpy as np
import pytest

from heygen_ray.config import SMOKE_OVERRIDES, ConfigError, DistributionSpec, SweepSpec, TrainSpec, load_spec, load_yaml
from heygen_ray.tune.space import SearchSpace, check_path, merge, set_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LM_BASE = load_yaml(os.path.join(REPO, "configs/train/language_modeling.yaml"))


def space(sp, base=LM_BASE):
    s = SearchSpace(TrainSpec, base, sp)
    s.validate()
    return s


@pytest.mark.parametrize("path, needle", [
    ("optim.lrr", "OptimSpec has no field 'lrr' at optim (did you mean 'lr'?)"),
    ("lr", "TrainSpec has no field 'lr' at <top level>"),
    ("schedule.warmup", "did you mean 'warmup_steps'"),
    ("optim.lr.value", "optim.lr is a value"),
    ("data.synth.shapes.first", "data.synth.shapes is a list"),
    ("ema..decay", "empty component"),
])
def test_a_path_that_does_not_exist_is_named(path, needle):
    with pytest.raises(ConfigError) as err:
        SearchSpace(TrainSpec, LM_BASE, {path: {"choice": [1]}})
    assert f"space.{path}" in str(err.value) and needle in str(err.value)


def test_paths_into_nested_specs_optional_specs_and_free_form_dicts_are_accepted():
    for path in ("optim.lr", "data.text.seq_len", "data.synth.noise_std", "fault.step",
                 "model.overrides.hidden_dimensions", "model.overrides.anything.below"):
        check_path(TrainSpec, path)


@pytest.mark.parametrize("sp, needle", [
    # a float drawn for an int field: uniform's bounds are floats
    ({"grad_accum_steps": {"uniform": [1, 4]}}, "grad_accum_steps: Input should be a valid integer (got 1.0 of type float)"),
    ({"batch_size": {"loguniform": [8, 64]}}, "batch_size: Input should be a valid integer"),
    # a choice value of the wrong type or outside a Literal
    ({"schedule.kind": {"choice": ["cosine", "exponential"]}}, "schedule.kind: Input should be 'cosine', 'linear' or 'constant'"),
    ({"precision": {"grid": ["fp32", 16]}}, "precision"),
    # out of a field's range at the upper end only
    ({"ema.decay": {"uniform": [0.9, 1.0]}}, "the upper end of uniform[0.9, 1.0]"),
    # a cross-field rule: warmup must stay below the plan's steps (randint's high is exclusive)
    ({"schedule.warmup_steps": {"randint": [0, 151]}}, "schedule.warmup_steps=150 must be < steps=150"),
])
def test_a_sampled_value_of_the_wrong_type_or_range_fails_naming_the_path(sp, needle):
    (path,) = sp
    with pytest.raises(ConfigError) as err:
        space(sp)
    msg = str(err.value)
    assert msg.startswith(f"space.{path}:") and needle in msg, msg


def test_valid_extremes_pass_and_randint_high_is_exclusive():
    space({"schedule.warmup_steps": {"randint": [0, 150]}, "ema.decay": {"uniform": [0.9, 0.999]},
           "optim.lr": {"loguniform": [1e-4, 1e-2]}, "grad_accum_steps": {"choice": [1, 2, 4]},
           "model.overrides.num_layers": {"grid": [1, 2]}})


def test_build_revalidates_a_combination_and_numpy_samples_become_python():
    s = space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"randint": [4, 17]}})
    spec = s.build({"optim.lr": np.float64(3e-3), "batch_size": np.int64(8)})
    assert spec.optim.lr == 3e-3 and spec.batch_size == 8 and type(spec.batch_size) is int
    with pytest.raises(ConfigError, match="batch_size: Input should be a valid integer"):
        s.build({"optim.lr": 1e-3, "batch_size": 8.0})
    with pytest.raises(ConfigError, match="outside the space: steps"):
        s.apply({"steps": 3})


def test_setting_a_field_of_an_optional_section_that_is_absent_creates_it():
    s = space({"fault.step": {"choice": [3]}})
    assert LM_BASE.get("fault") is None
    assert s.build({"fault.step": 3}).fault.step == 3


def test_conversion_to_tune_domains():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    s = space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "ema.decay": {"uniform": [0.9, 0.99]},
               "schedule.warmup_steps": {"randint": [0, 5]}, "schedule.kind": {"choice": ["cosine", "linear"]},
               "grad_accum_steps": {"grid": [1, 2]}})
    t = s.to_tune()
    assert isinstance(t["optim.lr"], Float) and isinstance(t["optim.lr"].get_sampler(), Float._LogUniform)
    assert (t["optim.lr"].lower, t["optim.lr"].upper) == (1e-4, 1e-2)
    assert isinstance(t["ema.decay"].get_sampler(), Float._Uniform)
    assert isinstance(t["schedule.warmup_steps"], Integer)
    assert (t["schedule.warmup_steps"].lower, t["schedule.warmup_steps"].upper) == (0, 5)
    assert isinstance(t["schedule.kind"], Categorical) and t["schedule.kind"].categories == ["cosine", "linear"]
    assert t["grad_accum_steps"] == tune.grid_search([1, 2])
    assert s.grid_size() == 2
    # grid search enumerates choices too
    g = s.to_tune(enumerate_choices=True)
    assert g["schedule.kind"] == tune.grid_search(["cosine", "linear"]) and s.grid_size(enumerate_choices=True) == 4
    # samples drawn from the domains build valid specs
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = {k: v.sample(random_state=rng) for k, v in t.items() if not isinstance(v, dict)}
        values["grad_accum_steps"] = 2
        spec = s.build(values)
        assert 1e-4 <= spec.optim.lr <= 1e-2 and 0 <= spec.schedule.warmup_steps < 5


def test_the_space_works_on_any_stage_spec():
    from heygen_ray.config import DataSpec

    s = SearchSpace(DataSpec, {}, {"video.clip_frames": {"choice": [4, 8]}, "synth.noise_std": {"uniform": [0.0, 0.1]}})
    s.validate()
    assert s.build({"video.clip_frames": 4, "synth.noise_std": 0.05}).video.clip_frames == 4
    with pytest.raises(ConfigError, match="space.synth.noise_std: the upper end of uniform"):
        SearchSpace(DataSpec, {}, {"synth.noise_std": {"uniform": [0.0, 0.9]}}).validate()


@pytest.mark.parametrize("dist, needle", [
    ({"uniform": [1, 1]}, "low must be < high"),
    ({"loguniform": [0, 1]}, "loguniform: low must be > 0"),
    ({"randint": [0.5, 3]}, "randint.0: Input should be a valid integer"),
    ({"choice": []}, "at least 1 item"),
    ({"choice": [1], "grid": [1]}, "exactly one of"),
    ({"normal": [0, 1]}, "normal: unknown field"),
])
def test_distributions_are_validated(dist, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        DistributionSpec.from_dict(dist)


def test_yaml_exponent_strings_are_read_as_numbers():
    assert DistributionSpec.from_dict({"loguniform": ["1e-4", 1.0e-2]}).args == [1e-4, 1e-2]


def test_merge_and_set_path():
    assert merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}, "d": {"x": 1}}) == {"a": {"b": 3, "c": 2}, "d": {"x": 1}}
    d = {"fault": None}
    set_path(d, "fault.step", 3)
    assert d == {"fault": {"step": 3}}


def test_sweep_spec_rules():
    base = {"base": "configs/train/language_modeling.yaml", "space": {"optim.lr": {"grid": [1e-3]}}}
    with pytest.raises(ConfigError, match="optuna does not enumerate grids"):
        SweepSpec.from_dict({**base, "search": {"algorithm": "optuna"}})
    with pytest.raises(ConfigError, match="space.optim.lr: search.algorithm='grid' needs grid or choice"):
        SweepSpec.from_dict({**base, "space": {"optim.lr": {"uniform": [1e-3, 1e-2]}}, "search": {"algorithm": "grid"}})
    with pytest.raises(ConfigError, match="objectives .* need search.algorithm='optuna'"):
        SweepSpec.from_dict({**base, "objectives": [{"metric": "model_gflops", "mode": "min"}]})
    with pytest.raises(ConfigError, match="metric and mode together"):
        SweepSpec.from_dict({**base, "metric": "val_loss"})
    with pytest.raises(ConfigError, match=r"space.optim.lr.loguniform.1: Input should be a valid number"):
        SweepSpec.from_dict({**base, "space": {"optim.lr": {"loguniform": [1e-4, "high"]}}})


def test_plan_validates_the_shipped_sweep_before_anything_runs(monkeypatch):
    from heygen_ray.tune.sweep import plan_sweep

    monkeypatch.chdir(REPO)
    spec = load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", SMOKE_OVERRIDES["sweep"])
    plan = plan_sweep(spec)
    assert (plan.metric, plan.mode, plan.max_steps, plan.grace_period) == ("val_ema_perplexity", "min", 24, 6)
    assert plan.base["steps"] == 24 and plan.base["scaling"]["num_workers"] == 1 and os.path.isabs(plan.base["run_dir"])

    bad = load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", ["space.schedule.warmup_steps={randint: [0, 100]}"])
    with pytest.raises(ConfigError, match=r"space.schedule.warmup_steps: the upper end of randint\[0, 100\]"):
        plan_sweep(bad)
    with pytest.raises(ConfigError, match="needs EMA"):
        plan_sweep(load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", ["space.ema.enabled={choice: [true, false]}",
                                                                     "metric=val_ema_perplexity", "mode=min"]))
    with pytest.raises(ConfigError, match="base: config file not found"):
        plan_sweep(load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", ["base=configs/train/nope.yaml"]))
    with pytest.raises(ConfigError, match="train.stepz|stepz: unknown field"):
        plan_sweep(load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", ["train.stepz=3"]))


def test_concurrency_fits_the_cluster(monkeypatch):
    from heygen_ray.tune.sweep import concurrency_for, plan_sweep, trial_cpus

    monkeypatch.chdir(REPO)
    spec = load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", ["max_concurrent_trials=3"])
    plan = plan_sweep(spec)
    assert trial_cpus(plan) == pytest.approx(0.96)  # 0.01 for the trial + 1 worker x 0.95
    assert concurrency_for(plan, 2.0) == 2 and concurrency_for(plan, 4.0) == 3 and concurrency_for(plan, 1.0) == 1
    with pytest.raises(ConfigError, match="one trial needs 1.91 CPUs"):
        concurrency_for(plan_sweep(load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml",
                                             ["train.scaling.num_workers=2"])), 1.0)
    # video trials also hold a decoder while their workers train
    vc = load_spec(SweepSpec, data={"base": "configs/train/video_classification.yaml", "space": {"optim.lr": {"choice": [1e-3]}}})
    assert trial_cpus(plan_sweep(vc)) == pytest.approx(0.01 + 2 * 0.5 + 0.5)


@pytest.mark.parametrize("objectives", [[], [{"metric": "model_gflops", "mode": "min"}]])
def test_optuna_proposes_values_that_build_valid_specs(monkeypatch, objectives):
    """TPE (single- and multi-objective) over the converted space, driven by hand without a cluster."""
    from heygen_ray.tune.sweep import _searcher, plan_sweep

    monkeypatch.chdir(REPO)
    spec = load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", ["search.algorithm=optuna", "search.seed=1",
                                                                   f"objectives={objectives}"])
    plan = plan_sweep(spec)
    assert [m for m, _ in plan.objectives] == ["val_ema_perplexity"] + [o["metric"] for o in objectives]
    searcher = _searcher(plan, concurrency=2)
    assert searcher.set_search_properties(None, None, {"params": plan.space.to_tune()})
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        values = config["params"]
        assert set(values) == set(plan.space.paths)
        built = plan.space.build(values)
        assert 3e-4 <= built.optim.lr <= 1e-2 and built.schedule.kind in ("cosine", "linear", "constant")
        searcher.on_trial_complete(f"t{i}", {"val_ema_perplexity": 10.0 + i, "model_gflops": 0.02, "config": config})


# --------------------------------------------------------------------------------------------------
# The tune package's layering, the train trial's spec, stop requests and the sweep's result
# --------------------------------------------------------------------------------------------------


def _tune_imports():
    """{tune module: the tune modules it imports, at module level or inside functions}, and the
    private Ray names each one mentions."""
    import ast

    folder = os.path.join(REPO, "heygen_ray", "tune")
    graph, private = {}, {}
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".py") or fname == "__init__.py":
            continue
        src = open(os.path.join(folder, fname)).read()
        deps = set()
        for node in ast.walk(ast.parse(src)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if n.startswith("heygen_ray.tune."):
                    deps.add(n.split(".")[2])
        graph[fname[:-3]] = deps - {fname[:-3]}
        private[fname[:-3]] = [s for s in ("internal_kv", "ray._private", "ray.experimental") if s in src]
    return graph, private


def test_tune_modules_import_one_way_and_touch_no_private_ray_api():
    graph, private = _tune_imports()
    assert graph["space"] == set() and graph["result"] == set()
    assert graph["stage"] == {"space"}  # the leaf: no adapter, no launcher
    assert graph["train"] <= {"space", "stage"} and graph["compress"] <= {"space", "stage"}
    assert {"train", "compress", "stage"} <= graph["sweep"]
    # no cycle, function-local imports included
    seen, done = set(), set()

    def visit(m, path):
        assert m not in seen or m in done, f"import cycle: {' -> '.join(path + [m])}"
        if m in done:
            return
        seen.add(m)
        for d in graph.get(m, ()):
            visit(d, path + [m])
        done.add(m)

    for m in graph:
        visit(m, [])
    assert all(not names for names in private.values()), private


def _lm_plan(*overrides):
    from heygen_ray.tune.sweep import plan_sweep

    return plan_sweep(load_spec(SweepSpec, "configs/sweep/lr_schedule.yaml", list(overrides)))


def test_the_train_trial_spec_reports_at_every_evaluation_nested_under_the_sweep_and_registers_nothing(monkeypatch):
    from heygen_ray.tune.stage import TRIAL_TAG
    from heygen_ray.tune.train import TRAIN_STAGE, trial_spec

    monkeypatch.chdir(REPO)
    p = _lm_plan("space.steps={choice: [20, 40]}")
    assert p.stage is TRAIN_STAGE and TRAIN_STAGE.planned_steps(p, {"optim.lr": 1e-3, "steps": 40}) == 40
    ctx = {"base": p.base, "name": p.spec.name, "trials_dir": p.trials_dir, "cwd": REPO,
           "tracking": {"enabled": True, "tracking_uri": "sqlite:////tmp/x.db", "experiment": "sweeps",
                        "parent_run_id": "parent123", "tags": {"heygen_ray.sweep": p.spec.name}}}
    values = {path: p.space.dimension(path).candidates()[-1] for path in p.space.paths}
    values["optim.lr"] = np.float64(values["optim.lr"])
    spec = trial_spec(ctx, values, "t0003")
    assert spec.name == f"{p.spec.name}_t0003" and spec.run_dir == p.trials_dir and spec.steps == 40
    assert spec.checkpoint_every_n_steps == spec.eval_every_n_steps and spec.optim.lr == float(values["optim.lr"])
    assert spec.tracking.parent_run_id == "parent123" and spec.tracking.tags[TRIAL_TAG] == "t0003"
    assert spec.tracking.registered_model_name is None
    cfg = TRAIN_STAGE.best_config(p, {"optim.lr": 2e-3, "steps": 20})
    assert cfg["name"] == f"{p.spec.name}_best" and cfg["optim"]["lr"] == 2e-3 and cfg["steps"] == 20
    assert "parent_run_id" not in (cfg.get("tracking") or {}) and TRAIN_STAGE.run_command == "heygen-ray train"


def test_stop_requests_live_in_the_clusters_key_value_store(monkeypatch):
    from heygen_ray import ray_private
    from heygen_ray.tune import stage

    store = {}
    monkeypatch.setattr(ray_private, "kv_put", lambda key, value: store.__setitem__(key, value))
    monkeypatch.setattr(ray_private, "kv_exists", lambda key: key in store)
    monkeypatch.setattr(ray_private, "kv_delete", lambda key: store.pop(key, None))
    assert not stage.stop_requested("t1")
    stage.request_stop("t1")
    assert store == {"sweep_stop:t1": b"1"} and stage.stop_requested("t1") and not stage.stop_requested("t2")
    stage.clear_stop("t1")
    assert store == {} and not stage.stop_requested("t1")


def _legacy_results(best=True):
    """A results dict laid out as run_sweep wrote results.json before it returned a SweepResult."""
    rows = [{"trial_id": "a", "status": "completed", "param:optim.lr": 0.01, "param:schedule.kind": "cosine", "step": 20,
             "planned_steps": 20, "reports": 4, "retries": 0, "mlflow_run_id": "r1", "error": None,
             "val_ema_perplexity": 12.5, "model_gflops": 0.02},
            {"trial_id": "b", "status": "error", "param:optim.lr": 1e-5, "param:schedule.kind": "linear", "step": 0,
             "planned_steps": 20, "reports": 0, "retries": 1, "mlflow_run_id": None, "error": "boom",
             "val_ema_perplexity": None, "model_gflops": None}]
    return {
        "name": "lm", "task": "language_modeling", "metric": "val_ema_perplexity", "mode": "min",
        "objectives": [{"metric": "val_ema_perplexity", "mode": "min"}, {"metric": "model_gflops", "mode": "min"}],
        "trials": 2, "trials_completed": 1, "trials_stopped_early": 0, "trials_error": 1, "concurrency": 2, "seconds": 31.4,
        "sweep_dir": "/s/lm", "trials_csv": "/s/lm/trials.csv", "mlflow_parent_run_id": "p1", "tracking_uri": "sqlite:///x.db",
        "summary_plot": "summary/metric_vs_params.png",
        "best": {"trial_id": "a", "mlflow_run_id": "r1", "metric": 12.5, "params": {"optim.lr": 0.01, "schedule.kind": "cosine"},
                 "step": 20, "model_gflops": 0.02} if best else None,
        "best_config_path": "/s/lm/best_config.yaml" if best else None, "model_version": "3" if best else None,
        "registered_model_name": "swept_lm" if best else None, "model_uri": "models:/swept_lm/3" if best else None,
        "pareto_front": ["a"], "teacher_uri": "/s/lm/teacher", "teacher_metrics": {"val_top1": 0.5},
        "data_info": {"vocab_size": 400}, "results_path": "/s/lm/results.json", "rows": rows,
    }


def test_the_sweep_result_round_trips_and_writes_results_json_as_before():
    import json

    from heygen_ray.tune.result import SweepResult

    legacy = _legacy_results()
    res = SweepResult.from_dict(legacy)
    assert res.best.trial_id == "a" and res.best.objectives == {"model_gflops": 0.02} and res.model_version == "3"
    assert res.objectives == [("val_ema_perplexity", "min"), ("model_gflops", "min")]
    assert res.extra == {"teacher_uri": "/s/lm/teacher", "teacher_metrics": {"val_top1": 0.5}}
    assert res.rows[0].params == {"optim.lr": 0.01, "schedule.kind": "cosine"}
    assert res.rows[1].metrics == {"val_ema_perplexity": None, "model_gflops": None} and res.rows[1].error == "boom"
    assert res.best_trial_dir == "/s/lm/trials/lm_a"
    # the same dict, key order included; results.json is it without the two in-memory keys
    assert list(res.to_dict().items()) == list(legacy.items())
    on_disk = {k: v for k, v in legacy.items() if k not in ("results_path", "rows")}
    assert json.dumps(res.results_json(), indent=2) == json.dumps(on_disk, indent=2)
    assert SweepResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res
    back = SweepResult.from_dict(json.loads(json.dumps(res.results_json())))  # read back from results.json
    assert back.rows == [] and back.results_path is None and back.results_json() == res.results_json()
    assert res.best.params["optim.lr"] == 0.01 and res.to_dict()["rows"][0]["param:optim.lr"] == 0.01
    assert res.extra["teacher_uri"] == "/s/lm/teacher" and "pareto_front" in res.to_dict()
    empty = SweepResult.from_dict(_legacy_results(best=False))
    assert empty.best is None and empty.best_trial_dir is None and empty.to_dict()["best"] is None
