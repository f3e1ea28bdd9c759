"""A real submission: `cluster/local/start.sh` (a `ray start --head` node with 0 CPUs plus a worker node,
token auth on, its own directory and free ports, an `mlflow server` beside it, a storage root), the
training job (`jobs/train.py --smoke-test`, the text decoder: data -> tokenizer -> DDP loop -> eval ->
checkpoint -> MLflow) sent with the real `ray job submit` CLI, stopped with `ray job stop` mid-training,
submitted again with edited code, and finished from its checkpoint in the same MLflow run on the
cluster's tracking server. On the same cluster, the pipeline job (data -> one training) is stopped
during its training and submitted again: the ledger on the storage root skips the data stage and the
training resumes in its MLflow run. Then `cluster/local/stop.sh` ends exactly that cluster (the server
too). These are the tests of the train and pipeline jobs as a user submits them."""

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

from heygen_ray.train.checkpoint import latest_checkpoint, read_meta

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


@pytest.fixture(scope="module")
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


TRAIN_JOB = ["jobs/train.py", "--config", "configs/train/language_modeling.yaml", "--smoke-test", *PLAN]


class Jobs:
    """The real `ray job submit` / `ray job stop` CLI against the test cluster, with its token, from a
    copy of what a job needs from a checkout (its entrypoints and configs; the package is installed)."""

    def __init__(self, root: Path):
        state = json.loads((root / "cluster.json").read_text())
        self.root = root
        self.dashboard, self.tracking_uri, self.store = state["dashboard"], state["mlflow"], Path(state["storage"])
        self.token = (root / "auth_token").read_text().strip()
        self.work = root / "code"
        for part in ("jobs", "configs"):
            shutil.copytree(REPO / part, self.work / part)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_", "HEYGEN_RAY_STORAGE"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(root / "auth_token"))

    def submit(self, submission_id: str, job: list, *extra: str) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
               "--working-dir", str(self.work), "--runtime-env", str(REPO / "cluster/runtime_env.yaml"), *extra, "--",
               "python", *job]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)

    def submit_and_stop(self, submission_id: str, job: list, checkpoints: Path) -> None:
        """Submitted without waiting, then `ray job stop` once a complete checkpoint is in ``checkpoints``
        (a folder under the storage root); returns when the job is STOPPED."""
        from ray.job_submission import JobSubmissionClient

        r = self.submit(submission_id, job, "--no-wait")
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})

        def status() -> str:
            st = str(jobs.get_job_status(submission_id).value)
            return st if st in ("STOPPED", "SUCCEEDED", "FAILED") else ""

        def checkpointed() -> bool:
            ended = status()  # a job that ended before its first checkpoint fails here, with its logs
            assert not ended, f"the job {submission_id} ended ({ended}) before a checkpoint:\n" + \
                jobs.get_job_logs(submission_id)[-6000:]
            return checkpoints.is_dir() and latest_checkpoint(str(checkpoints)) is not None

        _wait_for("a checkpoint under the storage root", checkpointed, timeout_s=300, poll_s=0.5)
        r = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", self.dashboard, submission_id], cwd=REPO,
                           env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

        assert _wait_for(f"the job {submission_id} to stop", status, timeout_s=120) == "STOPPED"


@pytest.fixture(scope="module")
def cluster(local_cluster_dir) -> Jobs:
    return Jobs(local_cluster_dir)


def _last_step(checkpoints: Path) -> int:
    """The step of the newest complete checkpoint in ``checkpoints``."""
    return read_meta(latest_checkpoint(str(checkpoints))).step


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
def test_a_stopped_job_submitted_again_resumes_its_checkpoint_and_mlflow_run(cluster):
    root, dashboard, token = cluster.root, cluster.dashboard, cluster.token
    tracking_uri, store = cluster.tracking_uri, cluster.store

    # token auth is on: the Jobs API refuses a request without the token and takes one with it
    assert _http_status(f"{dashboard}/api/jobs/", None) == 401
    assert _http_status(f"{dashboard}/api/jobs/", token) == 200
    # the tracking server beside the cluster serves, and the env file users source names it and the root
    assert _http_status(f"{tracking_uri}/health", None) == 200
    env_file = (root / "env").read_text()
    assert f"export MLFLOW_TRACKING_URI={tracking_uri}" in env_file and f"export HEYGEN_RAY_STORAGE={store}" in env_file

    # 1. submitted, then stopped once a checkpoint is on the storage root
    work = cluster.work
    run_dir = store / "runs" / "resumable"  # the relative run_dir, resolved under the storage root
    ckpts = run_dir / "checkpoints"
    cluster.submit_and_stop("first", TRAIN_JOB, ckpts)
    stopped_at = _last_step(ckpts)
    assert 20 <= stopped_at < 300 and not (run_dir / "results.json").exists()
    first_run = json.loads((run_dir / "mlflow_run.json").read_text())
    assert first_run["tracking_uri"] == tracking_uri  # the cluster's server, from the cluster's environment

    # 2. the code is edited (outside the model), the same command submitted again: it resumes
    (work / "jobs" / "train.py").write_text((work / "jobs" / "train.py").read_text() + "\n# edited after the stop\n")
    r = cluster.submit("second", TRAIN_JOB)
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


# The pipeline job: data -> one training, smoke sizes, a checkpoint every 20 of 300 steps (as PLAN: long
# enough to be stopped before it ends).
PIPELINE = """\
name: resumable_pipeline
stages: [data, train]
data:
  synth: {num_clips: 48}
  text: {vocab_size: 1024, seq_len: 64}
train:
  text_decoder:
    config: configs/train/language_modeling.yaml
    smoke_overrides: {steps: 300, checkpoint_every_n_steps: 20, eval_every_n_steps: 100, log_every_n_steps: 10,
                      scaling.num_workers: 1}
tracking: {experiment: resumable_pipeline}
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_pipeline_submitted_again_skips_finished_stages_and_resumes_its_training(cluster):
    """`ray job stop` during the pipeline's training, the same submission again: the data stage is
    skipped through the ledger on the storage root, the training resumes from its checkpoint in the same
    MLflow run on the cluster's tracking server and finishes at its planned step."""
    tracking_uri, store = cluster.tracking_uri, cluster.store
    (cluster.work / "configs" / "pipeline" / "resumable.yaml").write_text(PIPELINE)
    job = ["jobs/pipeline.py", "--config", "configs/pipeline/resumable.yaml", "--smoke-test"]
    out_dir = store / "runs" / "smoke_pipeline"  # the smoke output_dir, under the storage root
    train_dir = out_dir / "train" / "text_decoder"
    cluster.submit_and_stop("pipeline-first", job, train_dir / "checkpoints")
    ledger = json.loads((out_dir / "ledger.json").read_text())["units"]
    # the stopped driver marked its training failed (or was killed before it could: still running)
    assert ledger["data"]["status"] == "finished" and ledger["train.text_decoder"]["status"] in ("failed", "running")
    first_run = ledger["train.text_decoder"]["mlflow_run_id"]
    stopped_at = _last_step(train_dir / "checkpoints")

    r = cluster.submit("pipeline-second", job)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Job 'pipeline-second' succeeded" in out, out[-6000:]
    res = json.loads((out_dir / "results.json").read_text())
    status = {row["stage"]: row["status"] for row in res["summary"]}
    assert status == {"data": "skipped", "train.text_decoder": "resumed"}, status
    assert res["tracking_uri"] == tracking_uri
    trained = json.loads((train_dir / "results.json").read_text())
    assert trained["step"] == 300 and stopped_at <= trained["resumed_from"] < 300, (stopped_at, trained["resumed_from"])
    assert trained["mlflow_run_id"] == first_run == res["stages"]["train.text_decoder"]["mlflow_run_id"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(first_run)
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(first_run, "train_loss")})
    assert steps == list(range(10, 301, 10))  # one curve across the stop
