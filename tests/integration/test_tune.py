"""Sweeps on a real local Ray (4 logical CPUs) and a real MLflow server: ASHA early stopping, the MLflow
run tree, the best config that trains, a bad search space rejected before any trial, failing trials."""

import csv
import json
import os

import pytest
import yaml

from heygen_ray.config import ConfigError, SweepSpec, TrainSpec, load_spec
from heygen_ray.train.driver import run_training
from heygen_ray.tune.sweep import TRIAL_TAG, run_sweep

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sweep_spec(tmp_path, tiny_dataset, **over) -> SweepSpec:
    """A sweep over the tiny LM: 1 worker per trial (2 trials at a time on 4 logical CPUs)."""
    _, res = tiny_dataset
    data = {
        "name": "lm",
        "base": os.path.join(REPO, "configs/train/language_modeling.yaml"),
        "train": {
            "steps": 20, "batch_size": 8, "eval_every_n_steps": 5, "log_every_n_steps": 5, "max_failures": 0,
            "schedule": {"warmup_steps": 2},
            "model": {"overrides": {"hidden_dimensions": 64, "num_layers": 2, "num_attention_heads": 2}},
            "data": {"synth": {"output_dir": res.output_dir, "num_clips": 48, "seed": 3},
                     "text": {"tokenizer_dir": f"{tmp_path}/tok", "vocab_size": 400, "seq_len": 32}},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1.0},
        },
        "space": {"optim.lr": {"grid": [3e-3, 1e-2, 1e-5, 2e-5]}, "schedule.kind": {"choice": ["cosine", "linear"]}},
        "search": {"algorithm": "random", "num_samples": 1, "seed": 0},
        "scheduler": {"kind": "asha", "grace_period": 5, "reduction_factor": 2},
        "max_concurrent_trials": 2,
        "max_failures": 0,
        "run_dir": f"{tmp_path}/sweeps",
        "tracking": {"experiment": "sweep-test", "registered_model_name": "swept_lm"},
    }
    for key, value in over.items():  # tracking/search/scheduler: merged; anything else: replaced
        data[key] = {**data[key], **value} if key in ("tracking", "search", "scheduler") else value
    return SweepSpec.from_dict(data)


def test_asha_sweep_stops_trials_early_tracks_a_run_tree_and_writes_a_best_config_that_trains(
        ray_session, tmp_path, tiny_dataset, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, tiny_dataset, tracking={"tracking_uri": mlflow_server})
    out = run_sweep(spec).to_dict()  # the JSON-able summary (SweepResult)

    # 4 trials (the lr grid), 2 at a time; the 1e-5 learners are far behind at the step-5 rung
    rows = {r["trial_id"]: r for r in out["rows"]}
    assert out["trials"] == 4 and out["concurrency"] == 2 and out["trials_error"] == 0
    assert out["trials_stopped_early"] >= 1 and out["trials_completed"] >= 1
    stopped = [r for r in rows.values() if r["status"] == "stopped_early"]
    assert all(r["step"] < 20 for r in stopped) and all(r["step"] == 20 for r in rows.values() if r["status"] == "completed")
    best = out["best"]
    assert best["params"]["optim.lr"] in (3e-3, 1e-2)  # a learning rate that learns
    completed = [r["val_ema_perplexity"] for r in rows.values() if r["status"] == "completed"]
    assert best["metric"] == min(completed) < 400  # better than uniform over the vocabulary

    # MLflow: one parent run, one child per trial with its params and metric curves
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    parent = client.get_run(out["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["space.optim.lr.grid"] == "[0.003, 0.01, 1e-05, 2e-05]"
    assert parent.data.metrics["trials_stopped_early"] == out["trials_stopped_early"]
    exp = client.get_experiment_by_name("sweep-test")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags[TRIAL_TAG] for c in children) == sorted(rows)
    for child in children:
        row = rows[child.data.tags[TRIAL_TAG]]
        assert child.info.run_id == row["mlflow_run_id"]
        assert float(child.data.params["optim.lr"]) == row["param:optim.lr"]
        assert child.data.params["schedule.kind"] == row["param:schedule.kind"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_ema_perplexity")]
        assert steps == list(range(5, steps[-1] + 1, 5)) and steps[-1] >= row["step"]  # a curve, one point per eval
        if row["status"] == "completed":
            assert steps[-1] == 20
        expected = {"completed": "FINISHED", "stopped_early": "KILLED"}[row["status"]]
        assert child.info.status == expected and child.data.tags["heygen_ray.trial_status"] == row["status"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.csv", "summary/best_config.yaml", "summary/results.json"} <= artifacts
    assert any(a.startswith("summary/metric_vs_params.") for a in artifacts)
    table = list(csv.DictReader(open(out["trials_csv"])))
    assert len(table) == 4 and {"trial_id", "status", "param:optim.lr", "val_ema_perplexity", "mlflow_run_id"} <= set(table[0])

    # the best trial's model is registered
    mv = client.get_model_version("swept_lm", out["model_version"])
    assert mv.run_id == best["mlflow_run_id"] and mv.tags[TRIAL_TAG] == best["trial_id"]

    # results.json and a best config that loads as a TrainSpec and trains
    saved = json.load(open(os.path.join(out["sweep_dir"], "results.json")))
    assert saved["best"]["mlflow_run_id"] == best["mlflow_run_id"] and saved["model_version"] == out["model_version"]
    assert saved["best_config_path"] == out["best_config_path"]
    cfg = yaml.safe_load(open(out["best_config_path"]))
    assert cfg["optim"]["lr"] == best["params"]["optim.lr"] and cfg["name"] == "lm_best"
    assert "parent_run_id" not in cfg.get("tracking", {})
    spec = load_spec(TrainSpec, out["best_config_path"], [
        "steps=4", "eval_every_n_steps=2", "checkpoint_every_n_steps=2", "log_every_n_steps=2", "schedule.warmup_steps=1",
        f"run_dir={tmp_path}/best_runs", "tracking.enabled=false"])
    assert spec.schedule.kind == best["params"]["schedule.kind"]
    trained = run_training(spec).to_dict()
    assert trained["step"] == 4 and trained["metrics"]["val_ema_perplexity"] > 0


def test_an_invalid_search_space_is_rejected_before_any_trial_starts(ray_session, tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a sampled float for an int field: fails while planning, before Ray is even used
    spec = sweep_spec(tmp_path, tiny_dataset, space={"optim.lr": {"choice": [1e-3]}, "batch_size": {"uniform": [4, 16]}})
    with pytest.raises(ConfigError, match=r"(?s)space.batch_size: the lower end of uniform\[4.0, 16.0\].*valid integer"):
        run_sweep(spec)
    # a path that does not exist
    spec = sweep_spec(tmp_path, tiny_dataset, space={"optim.learning_rate": {"loguniform": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match="space.optim.learning_rate: OptimSpec has no field 'learning_rate'"):
        run_sweep(spec)
    # a model size that does not fit (3 heads do not divide width 64): found against the data, still before trials
    spec = sweep_spec(tmp_path, tiny_dataset, space={"model.overrides.num_attention_heads": {"choice": [2, 3]}})
    with pytest.raises(ConfigError,
                       match=r"(?s)space.model.overrides.num_attention_heads: the choice value 3: model .* not divisible by 3 heads"):
        run_sweep(spec)
    assert not os.path.exists(os.path.join(tmp_path, "sweeps", "lm", "trials"))
    assert not os.path.exists(os.path.join(tmp_path, "sweeps", "lm", "tune"))


def test_a_failing_trial_leaves_the_sweep_finished_and_a_retry_resumes_from_its_checkpoint(
        ray_session, tmp_path, tiny_dataset, monkeypatch):
    """Two trials, each killed at step 7 on its first attempt (fault injection; no Train-level retries).
    Tune retries both once: batch 8 resumes from its step-5 checkpoint and finishes; batch 4096 can
    never fill a batch and fails for good. The sweep finishes with the other trial as the best."""
    from heygen_ray import tracking as t

    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, tiny_dataset, name="faulty", max_failures=1,
                      space={"batch_size": {"grid": [8, 4096]}}, scheduler={"kind": "none"},
                      train={**sweep_spec(tmp_path, tiny_dataset).train, "steps": 10, "fault": {"rank": 0, "step": 7}})
    out = run_sweep(spec).to_dict()  # the JSON-able summary (SweepResult)
    rows = {r["param:batch_size"]: r for r in out["rows"]}
    ok, bad = rows[8], rows[4096]
    assert ok["status"] == "completed" and ok["retries"] == 1 and ok["step"] == 10
    assert bad["status"] == "error" and bad["retries"] == 1 and bad["error"]
    assert out["best"]["trial_id"] == ok["trial_id"] and out["trials_error"] == 1
    trial_results = json.load(open(os.path.join(out["sweep_dir"], "trials", f"faulty_{ok['trial_id']}", "results.json")))
    assert trial_results["resumed_from"] == 5 and trial_results["step"] == 10
    # one MLflow run per trial across retries (local sqlite store beside the sweep)
    assert out["tracking_uri"] == f"sqlite:///{tmp_path}/sweeps/faulty/mlflow.db"
    runs = t.find_runs(out["tracking_uri"], "sweep-test", parent_run_id=out["mlflow_parent_run_id"])
    assert sorted(r["tags"][TRIAL_TAG] for r in runs) == sorted([ok["trial_id"], bad["trial_id"]])
    status = {r["tags"][TRIAL_TAG]: r["status"] for r in runs}
    assert status == {ok["trial_id"]: "FINISHED", bad["trial_id"]: "FAILED"}


def test_a_compress_sweep_trains_one_teacher_and_reports_quality_and_latency_per_trial(ray_session, tmp_path, tiny_dataset,
                                                                                       monkeypatch):
    """Two compression trials (Optuna over prune ratio and distillation temperature; quality max,
    batch-1 latency min) on one teacher trained once by the sweep; tiny sizes."""
    from heygen_ray import tracking as t
    from heygen_ray.config import CompressSpec

    monkeypatch.chdir(tmp_path)
    _, res = tiny_dataset
    spec = SweepSpec.from_dict({
        "name": "csw", "stage": "compress", "base": os.path.join(REPO, "configs/compress/video_classifier.yaml"),
        "train": {
            "teacher_steps": 30,
            "train": {"steps": 10, "batch_size": 8, "eval_every_n_steps": 10, "checkpoint_every_n_steps": 10,
                      "log_every_n_steps": 5, "schedule": {"warmup_steps": 2},
                      # streamed, not cached: a trial's compression job would decode the cached splits twice
                      "data": {"synth": {"output_dir": res.output_dir, "num_clips": 48, "seed": 3}, "video": {"cache": False}},
                      "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}},
            "prune": {"unstructured_control": None}, "quantize": {"scheme": "int8_dynamic", "calibration_batches": 1},
            "measure": {"rounds": 1, "iters": 2, "max_eval_rows": 8},
        },
        "space": {"prune.ratio": {"uniform": [0.25, 0.6]}, "distill.temperature": {"uniform": [1.0, 4.0]}},
        "metric": "quality", "mode": "max", "objectives": [{"metric": "p50_ms_bs1", "mode": "min"}],
        "search": {"algorithm": "optuna", "num_samples": 2, "seed": 0},
        "max_concurrent_trials": 2, "max_failures": 0,
        "run_dir": f"{tmp_path}/sweeps", "tracking": {"experiment": "csweep-test"},
    })
    out = run_sweep(spec).to_dict()  # the JSON-able summary (SweepResult)

    assert out["trials"] == 2 and out["trials_completed"] == 2 and out["trials_error"] == 0 and out["concurrency"] == 2
    teacher = out["teacher_uri"]
    assert os.path.isdir(teacher) and teacher.startswith(out["sweep_dir"])
    for row in out["rows"]:
        assert 0.0 <= row["quality"] <= 1.0 and row["p50_ms_bs1"] > 0 and row["step"] == 10
        assert 0.25 <= row["param:prune.ratio"] <= 0.6
        # the trial compressed the sweep's one teacher, at its own sampled ratio
        trial = json.load(open(os.path.join(out["sweep_dir"], "trials", f"csw_{row['trial_id']}", "results.json")))
        assert trial["teacher_uri"] == teacher and trial["final_variant"] == "pruned_distilled_int8_dynamic"
        # a trial measures what it reports: the final variant against the fp32 and bf16 teachers
        assert [v["variant"] for v in trial["variants"]] == ["teacher_fp32", "teacher_bf16", "pruned_distilled_int8_dynamic"]
        final = next(v for v in trial["variants"] if v["variant"] == "pruned_distilled_int8_dynamic")
        assert final["speedup_bs1_vs_bf16"] > 0
        assert final["quality"] == row["quality"] and final["p50_ms_bs1"] == row["p50_ms_bs1"]
        assert final["params"] < next(v for v in trial["variants"] if v["variant"] == "teacher_fp32")["params"]
    assert not any(d.endswith("-teacher") for d in os.listdir(os.path.join(out["sweep_dir"], "trials")))  # trained once

    # the Pareto front over (quality max, latency min) and the best-quality trial
    assert out["pareto_front"] and set(out["pareto_front"]) <= {r["trial_id"] for r in out["rows"]}
    assert out["best"]["metric"] == max(r["quality"] for r in out["rows"])
    assert out["best"]["trial_id"] in out["pareto_front"]  # ties on quality are broken by latency

    # MLflow: the teacher's run and one compression run per trial under the sweep's run; nothing registered
    runs = t.find_runs(out["tracking_uri"], "csweep-test", parent_run_id=out["mlflow_parent_run_id"])
    assert sorted(r["tags"].get(TRIAL_TAG, "teacher") for r in runs) == sorted([r["trial_id"] for r in out["rows"]] + ["teacher"])
    assert all(r["status"] == "FINISHED" for r in runs)
    from mlflow import MlflowClient

    assert MlflowClient(out["tracking_uri"], registry_uri=out["tracking_uri"]).search_registered_models() == []

    # the best config: a compression YAML that loads as it is, with the sweep's teacher and the best values
    cfg = load_spec(CompressSpec, out["best_config_path"])
    assert cfg.teacher == teacher and cfg.name == "csw_best" and cfg.prune.ratio == out["best"]["params"]["prune.ratio"]
    assert cfg.registered_model_name == "video_classifier_compressed" and cfg.tracking.parent_run_id is None
