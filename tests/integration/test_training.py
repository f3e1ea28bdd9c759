"""Ray Train runs on a real local Ray with 2 DDP workers: learning, fault recovery, resume by name."""

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
    res = run_training(spec)
    # rank 1 died at step 14; the group restarted from the step-10 checkpoint and finished the plan
    assert res["step"] == 30 and res["resumed_from"] == 10
    assert open(os.path.join(res["run_dir"], ".fault-lm")).read().startswith("killed rank 1 at step 14")
    m = res["metrics"]
    # it learned: the templated corpus is far more predictable than uniform over the vocabulary
    assert m["val_perplexity"] < 0.25 * 400 and m["train_loss"] < math.log(400) - 1.0
    assert read_meta(res["checkpoint_uri"]).step == 30
    assert json.load(open(res["results_path"]))["step"] == 30

    # re-running the same name with a longer plan resumes from the final checkpoint of the first run
    again = run_training(lm_spec(tmp_path, tiny_dataset, name="lm", steps=36))
    assert again["resumed_from"] == 30 and again["step"] == 36


def test_bad_model_overrides_fail_before_workers_start(ray_session, tmp_path, tiny_dataset):
    spec = lm_spec(tmp_path, tiny_dataset, name="bad", **{"model.overrides": "{hidden_dimension: 64}"})
    with pytest.raises(ConfigError, match="model.overrides.*hidden_dimension"):
        run_training(spec)
