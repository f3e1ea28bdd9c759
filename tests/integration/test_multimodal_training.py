"""text_to_video with its GAN on a real local Ray, 2 DDP workers: recovery with both optimizers, samples (the
learning of every task is in tests/e2e/test_quickstart.py)."""

import os

import pytest
import torch

from heygen_ray.config import TrainSpec, load_spec
from heygen_ray.train.checkpoint import read_meta
from heygen_ray.train.driver import run_training

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def adam_steps(optimizer_state):
    """The step count AdamW keeps per parameter (all equal): how many updates this optimizer made."""
    steps = {float(s["step"]) for s in optimizer_state["state"].values()}
    assert len(steps) == 1, steps
    return steps.pop()


def test_text_to_video_gan_recovers_a_killed_worker_with_both_optimizers(ray_session, tmp_path, tiny_dataset):
    import av
    from mlflow.tracking import MlflowClient

    _, res = tiny_dataset
    spec = load_spec(TrainSpec, os.path.join(REPO, "configs/train/text_to_video.yaml"), [
        "name=gan", f"data.synth.output_dir={res.output_dir}", "data.synth.num_clips=48", "data.synth.seed=3",
        f"data.text.tokenizer_dir={tmp_path}/tok", "data.text.vocab_size=400", "data.text.caption_max_tokens=20",
        "loss.adversarial_loss_weight=0.1", "discriminator.base_channels=8", "discriminator.num_layers=2",
        "discriminator.schedule.kind=linear", "steps=12", "batch_size=4", "log_every_n_steps=3",
        "eval_every_n_steps=6", "checkpoint_every_n_steps=5", "schedule.warmup_steps=2", "fault.rank=1", "fault.step=8",
        f"run_dir={tmp_path}/runs", "tracking.registered_model_name=null",
    ])
    out = run_training(spec).to_dict()
    assert out["step"] == 12 and out["resumed_from"] == 5  # rank 1 died at step 8; restarted from step 5
    ckpt = out["checkpoint_uri"]
    assert read_meta(ckpt).step == 12 and os.path.isfile(os.path.join(ckpt, "extra", "discriminator.safetensors"))
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    # 12 updates each: had either optimizer restarted empty at the resume, it would count 7
    assert adam_steps(state["optimizer"]) == 12
    assert adam_steps(state["extra_discriminator_optimizer"]) == 12
    m = out["metrics"]
    assert {"d_loss", "d_real", "d_fake", "d_lr"} <= set(m) and m["d_loss"] > 0
    # the discriminator's own linear schedule (its lr falls) runs beside the generator's cosine one
    assert m["d_lr"] < spec.discriminator.optim.lr

    # samples at each evaluation (steps 6 and 12): [generated | real] as mp4 + GIF, also in MLflow
    dirs = out["samples_dirs"]
    assert [os.path.basename(d) for d in dirs][-2:] == ["step_00000006", "step_00000012"]
    for name, fmt in (("samples.mp4", "mp4"), ("samples.gif", "gif")):
        with av.open(os.path.join(dirs[-1], name), format=fmt) as container:
            assert sum(1 for _ in container.decode(video=0)) == 8
    client = MlflowClient(out["tracking_uri"])
    listed = {a.path for a in client.list_artifacts(out["mlflow_run_id"], "samples/step_00000012")}
    assert {"samples/step_00000012/samples.gif", "samples/step_00000012/samples.mp4",
            "samples/step_00000012/captions.txt"} <= listed
