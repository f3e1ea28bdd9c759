"""Ray Train runs on a real local Ray with 2 DDP workers: fault recovery, resume by name, tracking and
registration, forced precisions. (What each model learns: tests/e2e/test_quickstart.py.)"""

import json
import math
import os

import pytest

from heygen_ray.config import ConfigError, TrainSpec, load_spec
from heygen_ray.train.checkpoint import read_meta
from heygen_ray.train.driver import run_training

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lm_spec(tmp_path, tiny_dataset, **over):
    _, res = tiny_dataset
    overrides = [
        f"data.synth.output_dir={res.output_dir}", "data.synth.num_clips=48", "data.synth.seed=3",
        f"data.text.tokenizer_dir={tmp_path}/tok", "data.text.vocab_size=400", "data.text.seq_len=32",
        "model.overrides={hidden_dimensions: 64, num_layers: 2, num_attention_heads: 2}",
        "steps=30", "batch_size=8", "log_every_n_steps=5", "checkpoint_every_n_steps=10", "eval_every_n_steps=10",
        "optim.lr=0.003", "schedule.warmup_steps=3", f"run_dir={tmp_path}/runs", "tracking.enabled=false",
        "scaling.cpus_per_worker=0.5", "data.text.tokenizer_num_cpus=0.5",
    ] + [f"{k}={v}" for k, v in over.items()]
    return load_spec(TrainSpec, os.path.join(REPO, "configs/train/language_modeling.yaml"), overrides)


def test_worker_killed_mid_run_recovers_then_same_name_resumes(ray_session, tmp_path, tiny_dataset):
    spec = lm_spec(tmp_path, tiny_dataset, name="lm", **{"fault.rank": 1, "fault.step": 14})
    res = run_training(spec).to_dict()
    # rank 1 died at step 14; the group restarted from the step-10 checkpoint and finished the plan
    assert res["step"] == 30 and res["resumed_from"] == 10
    # configs/train/language_modeling.yaml names fp32: kept as named, across the restart
    assert res["precision"] == "fp32" and res["precision_reason"] == "set in the config"
    assert open(os.path.join(res["run_dir"], ".fault-lm")).read().startswith("killed rank 1 at step 14")
    m = res["metrics"]
    # it learned: the templated corpus is far more predictable than uniform over the vocabulary
    assert m["val_perplexity"] < 0.25 * 400 and m["train_loss"] < math.log(400) - 1.0
    assert read_meta(res["checkpoint_uri"]).step == 30
    assert json.load(open(res["results_path"]))["step"] == 30

    # re-running the same name with a longer plan resumes from the final checkpoint of the first run
    again = run_training(lm_spec(tmp_path, tiny_dataset, name="lm", steps=36)).to_dict()
    assert again["resumed_from"] == 30 and again["step"] == 36
    # everything the run keeps (Ray Train's storage and checkpoints too) lies in its folder, so deleting
    # that folder (the pipeline does, for a changed or forced unit) leaves nothing to resume from
    assert again["checkpoint_uri"].startswith(os.path.join(res["run_dir"], ""))
    assert os.listdir(os.path.dirname(res["run_dir"])) == ["lm"]
    assert os.path.isdir(os.path.join(res["run_dir"], "ray"))


def test_bad_model_overrides_fail_before_workers_start(ray_session, tmp_path, tiny_dataset):
    spec = lm_spec(tmp_path, tiny_dataset, name="bad", **{"model.overrides": "{hidden_dimension: 64}"})
    with pytest.raises(ConfigError, match="model.overrides.*hidden_dimension"):
        run_training(spec)


@pytest.fixture(scope="module")
def tracked_run(ray_session, tmp_path_factory, tiny_dataset):
    """A short classification run, tracked and registered, with bf16 forced (asserted by two tests)."""
    _, res = tiny_dataset
    tmp = tmp_path_factory.mktemp("tracked")
    spec = load_spec(TrainSpec, os.path.join(REPO, "configs/train/video_classification.yaml"), [
        "name=vc", f"data.synth.output_dir={res.output_dir}", "data.synth.num_clips=48", "data.synth.seed=3",
        "steps=6", "batch_size=4", "log_every_n_steps=2", "checkpoint_every_n_steps=3", "eval_every_n_steps=3",
        "schedule.warmup_steps=1", f"run_dir={tmp}/runs", "tracking.registered_model_name=vc_test", "precision=bf16",
    ])
    return run_training(spec).to_dict()


def test_classification_run_is_tracked_and_registered(tracked_run):
    import torch
    from mlflow.tracking import MlflowClient

    from heygen_ray.tracking import load_model

    out = tracked_run
    assert out["model_version"] == "1" and out["registered_model_name"] == "vc_test"
    client = MlflowClient(out["tracking_uri"], registry_uri=out["tracking_uri"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "cnn_video_micro" and run.data.params["steps"] == "6"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4, 6]
    assert {"val_accuracy", "val_ema_accuracy", "lr", "samples_per_s", "frames_per_s", "mfu", "data_wait_share"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "curves.png"} <= artifacts and any(a.startswith("confusion_matrix") for a in artifacts)
    model = load_model("models:/vc_test/1", tracking_uri=out["tracking_uri"])
    assert type(model).__name__ == "FrameVideoClassifier"
    logits = model(video=torch.zeros(2, 3, 8, 32, 32))
    assert logits.shape == (2, 16) and torch.isfinite(logits).all()


def test_a_forced_precision_is_kept_and_trains(tracked_run):
    """`precision: auto` is the default; a config that names bf16 gets exactly that (under autocast even
    where it is emulated and slow), with the reason logged. (fp32 named in a config: the language model
    run of the fault test.)"""
    out = tracked_run
    assert out["precision"] == "bf16" and out["precision_reason"] == "set in the config"
    assert read_meta(out["checkpoint_uri"]).step == out["step"]
    assert math.isfinite(out["metrics"]["train_loss"]) and math.isfinite(out["metrics"]["val_loss"])
