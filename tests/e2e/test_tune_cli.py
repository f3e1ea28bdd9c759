"""`heygen-ray tune` / `jobs/tune.py` as a user runs them: a bad sweep fails before Ray starts."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args, timeout=120):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_tune_job_rejects_a_bad_search_space_before_starting_ray():
    r = run("jobs/tune.py", "--config", "configs/sweep/lr_schedule.yaml", "--smoke-test",
            "space.grad_accum_steps={uniform: [1, 4]}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "space.grad_accum_steps" in r.stderr and "valid integer" in r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout
    r = run("jobs/tune.py", "--config", "configs/sweep/lr_schedule.yaml", "space.optim.learning_rate={choice: [0.1]}")
    assert r.returncode == 2 and "space.optim.learning_rate" in r.stderr
    assert "OptimSpec has no field 'learning_rate'" in r.stderr


def test_tune_job_rejects_asha_for_a_compress_sweep_before_starting_ray():
    r = run("jobs/tune.py", "--config", "configs/sweep/compress_video_classifier.yaml", "--smoke-test",
            "scheduler.kind=asha")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "scheduler.kind: asha stops trials on their intermediate reports" in r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout
