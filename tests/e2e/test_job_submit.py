"""A real submission: `cluster/local/start.sh` (a `ray start --head` node with 0 CPUs plus a worker node,
token auth on, its own directory and free ports), the training job (`jobs/train.py --smoke-test`, the
text decoder: data -> tokenizer -> DDP loop -> eval -> checkpoint -> MLflow) sent with the real
`ray job submit` CLI, its printed results and MLflow run read back, and `cluster/local/stop.sh` ending
exactly that cluster. This is the test of the train job as a user submits it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "cluster" / "local"))

import local_cluster  # noqa: E402  (cluster/local/local_cluster.py: to find the cluster's processes)

# Small enough for 2 CPUs: 6 steps, one Train worker; still data -> DDP loop -> eval -> checkpoint ->
# MLflow run + registered model, exactly as the job runs on a real cluster.
FAST = ["steps=6", "checkpoint_every_n_steps=6", "eval_every_n_steps=6", "log_every_n_steps=2",
        "scaling.num_workers=1"]


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def local_cluster_dir():
    """A short directory in /tmp (Ray's unix sockets live under it; pytest's tmp_path is too long)."""
    root = Path(tempfile.mkdtemp(prefix="hr-e2e-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    started = subprocess.run([str(REPO / "cluster/local/start.sh"), "--dir", str(root), "--worker-cpus", "4",
                              "--object-store-mb", "256"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr + (root / "start.log").read_text()[-3000:]
        yield root
    finally:
        stopped = subprocess.run([str(REPO / "cluster/local/stop.sh"), "--dir", str(root)], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
        left = local_cluster.cluster_pids(root, {})
        shutil.rmtree(root, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not left, f"processes of the test cluster still running: {sorted(left)}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_job_through_ray_job_submit_on_a_token_auth_cluster(local_cluster_dir):
    root = local_cluster_dir
    state = json.loads((root / "cluster.json").read_text())
    dashboard = state["dashboard"]
    token = (root / "auth_token").read_text().strip()

    # token auth is on: the Jobs API refuses a request without the token and takes one with it
    assert _http_status(f"{dashboard}/api/jobs/", None) == 401
    assert _http_status(f"{dashboard}/api/jobs/", token) == 200

    work = root / "job"
    db = work / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(root / "auth_token"))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", "e2e-train",
           "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster/runtime_env.yaml"), "--",
           "python", "jobs/train.py", "--config", "configs/train/language_modeling.yaml", "--smoke-test",
           *FAST, f"run_dir={work}/runs", f"data.synth.output_dir={work}/data", f"tracking.tracking_uri=sqlite:///{db}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Job 'e2e-train' succeeded" in out

    # the job ran on the cluster (the CLI only streamed its logs) and wrote its results on the shared path
    res = json.loads((work / "runs" / "language_modeling" / "results.json").read_text())
    assert res["step"] == 6 and res["tracking_uri"] == f"sqlite:///{db}"
    assert res["registered_model_name"] == "text_decoder" and res["model_version"] == "1"
    assert res["metrics"]["val_perplexity"] < 1024 and "->" in res["samples"]  # a prompt and its continuation
    assert "results:" in out and str(work) in out  # the job prints where its results are

    # the MLflow run it produced: finished, with training and validation metrics, and the model registered
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {"train_loss", "lr", "val_perplexity", "val_ema_perplexity"} <= set(run.data.metrics)
    assert run.data.params  # the flattened spec
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2  # logged every 2 of 6 steps
    version = client.get_model_version("text_decoder", "1")
    assert version.run_id == run.info.run_id
