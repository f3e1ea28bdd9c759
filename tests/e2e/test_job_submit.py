"""A real submission: `cluster/local/start.sh` (a `ray start --head` node with 0 CPUs plus a worker node,
token auth on, its own directory and free ports, an `mlflow server` beside it, a storage root), the
training job (`jobs/train.py --smoke-test`, the text decoder: data -> tokenizer -> DDP loop -> eval ->
checkpoint -> MLflow) sent with the real `ray job submit` CLI, stopped with `ray job stop` mid-training,
submitted again with edited code, and finished from its checkpoint in the same MLflow run on the
cluster's tracking server; then `cluster/local/stop.sh` ends exactly that cluster (the server too).
This is the test of the train job as a user submits it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import local_cluster  # cluster/local/local_cluster.py (on the path: tests/conftest.py): its processes
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# One Train worker, a checkpoint every 20 steps: long enough to be stopped mid-run, short enough for CI.
PLAN = ["name=resumable", "steps=300", "checkpoint_every_n_steps=20", "eval_every_n_steps=100", "log_every_n_steps=10",
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
    """A short directory in /tmp (Ray's unix sockets live under it; pytest's tmp_path is too long), with
    the cluster's storage root inside it."""
    root = Path(tempfile.mkdtemp(prefix="hr-e2e-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    started = subprocess.run([str(REPO / "cluster/local/start.sh"), "--dir", str(root), "--worker-cpus", "4",
                              "--object-store-mb", "256", "--storage", str(root / "store")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
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


def _wait_for(what: str, check, timeout_s: float, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_job_submitted_again_resumes_its_checkpoint_and_mlflow_run(local_cluster_dir):
    root = local_cluster_dir
    state = json.loads((root / "cluster.json").read_text())
    dashboard, tracking_uri, store = state["dashboard"], state["mlflow"], Path(state["storage"])
    token = (root / "auth_token").read_text().strip()

    # token auth is on: the Jobs API refuses a request without the token and takes one with it
    assert _http_status(f"{dashboard}/api/jobs/", None) == 401
    assert _http_status(f"{dashboard}/api/jobs/", token) == 200
    # the tracking server beside the cluster serves, and the env file users source names it and the root
    assert _http_status(f"{tracking_uri}/health", None) == 200
    env_file = (root / "env").read_text()
    assert f"export MLFLOW_TRACKING_URI={tracking_uri}" in env_file and f"export HEYGEN_RAY_STORAGE={store}" in env_file

    # what the job needs from a checkout: its entrypoints and configs (the package is installed)
    work = root / "code"
    for part in ("jobs", "configs"):
        shutil.copytree(REPO / part, work / part)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_", "HEYGEN_RAY_STORAGE"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(root / "auth_token"))

    def submit(submission_id: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", submission_id,
               "--working-dir", str(work), "--runtime-env", str(REPO / "cluster/runtime_env.yaml"), *extra, "--",
               "python", "jobs/train.py", "--config", "configs/train/language_modeling.yaml", "--smoke-test", *PLAN]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    # 1. submitted, then stopped once a checkpoint is on the storage root
    r = submit("first", "--no-wait")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = store / "runs" / "resumable"  # the relative run_dir, resolved under the storage root
    ckpts = run_dir / "checkpoints"
    _wait_for("a checkpoint under the storage root", lambda: ckpts.is_dir() and any(
        (d / "meta.json").exists() for d in ckpts.glob("step_*")), timeout_s=300)
    r = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", dashboard, "first"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token}"})

    def status() -> str:
        st = str(jobs.get_job_status("first").value)
        return st if st in ("STOPPED", "SUCCEEDED", "FAILED") else ""

    assert _wait_for("the first job to stop", status, timeout_s=120) == "STOPPED"
    stopped_at = max(int(d.name.split("_")[1]) for d in ckpts.glob("step_*") if (d / "meta.json").exists())
    assert 20 <= stopped_at < 300 and not (run_dir / "results.json").exists()
    first_run = json.loads((run_dir / "mlflow_run.json").read_text())
    assert first_run["tracking_uri"] == tracking_uri  # the cluster's server, from the cluster's environment

    # 2. the code is edited (outside the model), the same command submitted again: it resumes
    (work / "jobs" / "train.py").write_text((work / "jobs" / "train.py").read_text() + "\n# edited after the stop\n")
    r = submit("second")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Job 'second' succeeded" in out, out[-6000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["step"] == 300 and stopped_at <= res["resumed_from"] < 300, (stopped_at, res["resumed_from"])
    assert res["tracking_uri"] == tracking_uri and res["mlflow_run_id"] == first_run["run_id"]
    assert f"results: {run_dir / 'results.json'}" in out.replace("\n", "")  # the job prints where its results are
    # everything under the storage root, nothing in the jobs' temporary copies of the code
    assert (store / "data" / "smoke" / "tokenizer" / "tokenizer.json").is_file()
    assert not list(root.glob("ray-*/**/working_dir_files/*/runs")) and not list(root.glob("ray-*/**/working_dir_files/*/data"))

    # 3. one MLflow run on the tracking server, finished, its curve continuous up to the planned step
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "resumable"
    runs = client.search_runs([run.info.experiment_id], "attributes.run_name = 'resumable'")
    assert [x.info.run_id for x in runs] == [run.info.run_id]
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train_loss")})
    assert steps == list(range(10, 301, 10))  # every logged step, before the stop and after the resume
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_perplexity")} == {100, 200, 300}
    assert res["metrics"]["val_perplexity"] < 1024 and "->" in res["samples"]  # it learned; a prompt and its continuation
    version = client.get_model_version("text_decoder", res["model_version"])
    assert version.run_id == run.info.run_id

    # 4. the registered model carries what it needs: with its run folder and the data (tokenizer
    # included) deleted, it loads from the registry alone, as a Serve replica on another node would
    from heygen_ray.config import ServeEndpointSpec
    from heygen_ray.serve.forward import Prep
    from heygen_ray.serve.loader import load_variant

    shutil.rmtree(run_dir)
    shutil.rmtree(store / "data")
    model, info = load_variant(f"models:/text_decoder/{res['model_version']}", tracking_uri=tracking_uri)
    assert not os.path.exists(info["data_info"]["tokenizer_dir"])  # the folder training read it from is gone
    prep = Prep(info, ServeEndpointSpec(), "complete")
    assert prep.tokenizer.vocab_size == info["data_info"]["vocab_size"] and model is not None
    assert prep.tokenizer.decode(prep.tokenizer.encode("a red circle moves left")) == "a red circle moves left"
