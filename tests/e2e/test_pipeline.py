"""`jobs/pipeline.py --smoke-test` exactly as a user runs it (a subprocess with its own local Ray):
every stage runs, MLflow holds one pipeline run with a child per stage, champions are aliased; a
second submission skips the finished stages (checked through the ledger) and resumes a training the
ledger shows unfinished from its checkpoint, in the same MLflow run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run(*args, timeout=1200):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TORCHINDUCTOR_COMPILE_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "configs/pipeline/quickstart.yaml",
                           "--smoke-test", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_pipeline_smoke_end_to_end_then_resubmission_skips_and_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    common = [f"output_dir={out}", f"data.synth.output_dir={tmp_path}/data"]
    r = run(*common)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    units = [row["stage"] for row in res["summary"]]
    assert units == ["data", "train.video_classifier", "train.video_text_matching", "train.text_to_video", "tune",
                     "compress", "evaluate.test", "evaluate.unseen", "serve"]
    assert all(row["status"] == "ran" for row in res["summary"]), res["summary"]
    assert res["stages"]["tune"]["trials"] == 2  # the quickstart's tune.smoke_overrides over the sweep's smoke sizes
    ledger = json.loads((out / "ledger.json").read_text())["units"]
    assert all(ledger[u]["status"] == "finished" and ledger[u]["key"] for u in units)
    for stage in ("stage", "status", "key metric", "seconds"):
        assert stage in r.stdout  # the summary table
    assert "mlflow ui --backend-store-uri sqlite:" in r.stdout
    # where to look: the dashboard and the log folder; the workers' logs went there, not to the console
    # (the quickstart sets ray.log_to_driver: false)
    assert "Ray:       http://127.0.0.1:" in r.stdout and f"Ray logs:  {res['ray_logs']}" in r.stdout
    assert os.path.isdir(res["ray_logs"]) and "(RayTrainWorker pid=" not in r.stdout + r.stderr
    assert "Trial status:" not in r.stdout + r.stderr and "Downloading artifacts" not in r.stdout + r.stderr

    # MLflow: one pipeline run, a child per stage, the stages' own runs under their stage's run
    client = MlflowClient(res["tracking_uri"], registry_uri=res["tracking_uri"])
    parent = client.get_run(res["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {c.data.tags["heygen_ray.stage"]: c for c in children}
    assert set(by_stage) == {"data", "train", "tune", "compress", "evaluate", "serve"}
    train_runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{by_stage['train'].info.run_id}'")
    assert len(train_runs) == 3
    # the champions: the compressed classifier (gate), the text-to-video model, the swept decoder
    outs = res["stages"]
    # smoke sizes do not learn: the trainings' gates are reported, not applied, so the chain runs
    assert outs["train.video_classifier"]["gate"] == "not applied (smoke)"
    for unit in ("train.video_classifier", "train.video_text_matching", "train.text_to_video", "tune"):
        o = outs[unit]
        assert o["champion"], (unit, o)
        mv = client.get_model_version_by_alias(o["registered_model_name"], "champion")
        assert str(mv.version) == str(o["model_version"])
    assert outs["compress"]["teacher_uri"].startswith("models:/video_classifier/")
    # the unseen clips: drawn with another seed beside the pipeline's data, no more than the smoke size
    assert outs["evaluate.test"]["manifest"] == f"{tmp_path}/data/manifest.parquet"
    # the trainings' final validation metrics are in results.json
    assert {"val_ema_accuracy", "val_accuracy"} <= set(outs["train.video_classifier"]["metrics"])
    assert "val_ema_judge_accuracy" in outs["train.text_to_video"]["metrics"]
    unseen = outs["evaluate.unseen"]
    assert unseen["manifest"] == f"{tmp_path}/data_unseen/manifest.parquet" and 0 < unseen["rows"] <= 48
    assert 0.0 <= unseen["metrics"]["accuracy"] <= 1.0 and unseen["checks"]["accuracy"]["min"] == 0.93

    # second submission: the same spec -> every stage but serve skipped; mark one training unfinished
    # (as if the job died after its last checkpoint): it resumes in its own MLflow run
    t2v_run = ledger["train.text_to_video"]["outputs"]["mlflow_run_id"]
    ledger["train.text_to_video"]["status"] = "running"
    ledger["train.text_to_video"]["mlflow_run_id"] = t2v_run
    (out / "ledger.json").write_text(json.dumps({"version": 1, "units": ledger}))
    r2 = run(*common)
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    res2 = json.loads((out / "results.json").read_text())
    status = {row["stage"]: row["status"] for row in res2["summary"]}
    assert status == {"data": "skipped", "train.video_classifier": "skipped", "train.video_text_matching": "skipped",
                      "train.text_to_video": "resumed", "tune": "skipped", "compress": "skipped",
                      "evaluate.test": "skipped", "evaluate.unseen": "skipped", "serve": "ran"}, status
    ledger2 = json.loads((out / "ledger.json").read_text())["units"]
    assert ledger2["train.text_to_video"]["status"] == "finished" and ledger2["train.text_to_video"]["resumed"]
    assert ledger2["train.text_to_video"]["outputs"]["mlflow_run_id"] == t2v_run
    assert ledger2["compress"]["finished_at"] == ledger["compress"]["finished_at"]  # untouched
