"""heygen_ray.tracking against a real `mlflow server` (http, proxied artifacts)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from heygen_ray.models import create_model
from heygen_ray.tracking import load_model, load_pyfunc, log_model, make_tracker, resolve_model_uri, set_alias


@pytest.mark.slow
def test_run_and_model_round_trip_through_server(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # anything written relative to the CWD would show up here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = {"tracking_uri": mlflow_server, "experiment": "server-test", "tags": {"suite": "integration"}}
    run_dir = tmp_path / "run"

    torch.manual_seed(0)
    models = [create_model("vit_video_micro", num_classes=4), create_model("vit_video_micro", num_classes=4)]
    with make_tracker(spec, str(run_dir), rank=0, run_name="driver") as parent:
        with make_tracker(spec, str(run_dir), rank=0, run_name="train", nested_under=parent) as t:
            t.log_params({"model": {"name": "vit_video_micro", "num_classes": 4}})
            t.log_metrics({"loss": 1.5}, step=0)
            t.log_metrics({"loss": 0.5}, step=1)
            t.log_curve_plot({"loss": [(0, 1.5), (1, 0.5)]}, "curves.svg")
            logged = [
                log_model(t, m, model_name="vit_video_micro", model_overrides={"num_classes": 4},
                          registered_model_name="server-video", extra={"variant": f"v{i}"})
                for i, m in enumerate(models)
            ]
    assert [model.version for model in logged] == ["1", "2"]
    assert not run_dir.exists() and os.listdir(tmp_path) == []  # server decides where artifacts go

    set_alias("server-video", "champion", logged[0].version, tracking_uri=mlflow_server)
    set_alias("server-video", "champion", logged[1].version, tracking_uri=mlflow_server)  # move it

    # a fresh client, as another process (a Serve replica) would use
    other = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = other.get_run(t.run_id)
    assert run.data.params == {"model.name": "vit_video_micro", "model.num_classes": "4"}
    assert [m.value for m in other.get_metric_history(t.run_id, "loss")] == [1.5, 0.5]
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["suite"] == "integration"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    assert "curves.svg" in [a.path for a in other.list_artifacts(t.run_id)]
    mv = other.get_model_version_by_alias("server-video", "champion")
    assert mv.version == "2" and mv.run_id == t.run_id and mv.source == logged[1].model_uri

    ref = resolve_model_uri("models:/server-video@champion", tracking_uri=mlflow_server)
    assert (ref.name, ref.version, ref.run_id) == ("server-video", "2", t.run_id)
    x = models[1].example_inputs(2)
    loaded = load_model("models:/server-video@champion", tracking_uri=mlflow_server)
    assert type(loaded) is type(models[1])
    with torch.no_grad():
        want = models[1].eval()(**x)
        assert torch.equal(loaded(**x), want)
    out = load_pyfunc("models:/server-video@champion", tracking_uri=mlflow_server).predict({"video": x["video"].numpy()})
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-5)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_training_tracker_keeps_going_while_the_server_is_down_and_catches_up(tmp_path, monkeypatch):
    """A real server of its own, stopped mid-run and started again on the same port and store: the
    logging calls made while it is down return at once (no exception, no minutes of HTTP retries), the
    metrics are queued and arrive in order once it is back, and what never arrived is named."""
    import time

    from mlflow_server import start_mlflow_server, stop_mlflow_server

    from heygen_ray.train import track

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    proc, uri = start_mlflow_server(tmp_path / "server")
    port = int(uri.rsplit(":", 1)[1])
    tracking = {"tracking_uri": uri, "experiment": "resilient"}
    try:
        # the CLI and its one uvicorn worker (the server's process group): MLflow's job runner (8 more) is off
        group = subprocess.run(["ps", "-o", "args=", "-g", str(proc.pid)], capture_output=True, text=True).stdout.splitlines()
        assert len(group) == 2 and "mlflow server" in group[0] and "-m uvicorn" in group[1], group
        run_id = track.start_training_run(tracking, str(tmp_path), run_name="r", spec={"steps": 3})
        tracker = track.attach(tracking, str(tmp_path), rank=0, run_id=run_id, resilient=True)
        tracker.retry_after_s = 0.0  # try again at every call (the loop's default waits 30 s between tries)
        tracker.log_metrics({"loss": 1.0}, step=1)
        stop_mlflow_server(proc)
        t0 = time.monotonic()
        tracker.log_metrics({"loss": 0.5}, step=2)
        tracker.log_text("hello", "notes.txt")
        assert time.monotonic() - t0 < 20
        assert tracker.not_logged()["metric_points"] == 1 and tracker.not_logged()["calls"] == ["log_text hello"]
        proc, _ = start_mlflow_server(tmp_path / "server", port=port)
        tracker.log_metrics({"loss": 0.25}, step=3)  # the queued step 2 goes first
        from mlflow.tracking import MlflowClient

        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
        missing = tracker.close()
        assert missing == {"calls": ["log_text hello"], "last_error": missing["last_error"]} and missing["last_error"]
        assert "log_text hello" in MlflowClient(uri).get_run(run_id).data.tags["heygen_ray.not_logged"]
    finally:
        stop_mlflow_server(proc)
        for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # what attach set for the worker
            os.environ.pop(var, None)
