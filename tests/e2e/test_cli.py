"""The command line and the job entrypoints, run exactly as a user runs them (subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args, timeout=300):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_config_show_resolves_overrides():
    r = run(str(BIN / "heygen-ray"), "config", "show", "--config", "configs/data/quickstart.yaml", "video.clip_frames=12")
    assert r.returncode == 0, r.stderr
    spec = yaml.safe_load(r.stdout)
    assert spec["video"]["clip_frames"] == 12 and spec["video"]["manifest"] == "data/quickstart/manifest.parquet"


def test_bad_config_fails_before_anything_runs():
    r = run(str(BIN / "heygen-ray"), "data", "run", "--config", "configs/data/quickstart.yaml", "video.clip_frams=8")
    assert r.returncode == 2
    assert "video.clip_frams" in r.stderr and "clip_frames" in r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout  # failed before Ray started
    r = run(str(BIN / "heygen-ray"), "data", "run", "--config", "configs/data/quickstart.yaml", "synth.num_clips=2.5")
    assert r.returncode == 2 and "synth.num_clips" in r.stderr


@pytest.mark.slow
def test_data_job_smoke_test_end_to_end(tmp_path):
    out = tmp_path / "results.json"
    r = run(sys.executable, "jobs/data.py", "--config", "configs/data/quickstart.yaml", "--smoke-test",
            f"synth.output_dir={tmp_path}/data", "--results", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["synth"]["num_clips"] == 32
    splits = res["video"]["splits"]
    assert sum(s["clips"] for s in splits.values()) == 32
    assert all(s["dropped"] == 0 and s["shape"] == [8, 32, 32, 3] for s in splits.values())
    assert res["text"]["sequences"] > 0 and res["text"]["seq_len"] == 64
    assert (tmp_path / "data" / "manifest.parquet").exists() and (tmp_path / "data" / "tokenizer" / "tokenizer.json").exists()
    assert "video pipeline" in r.stdout and "text pipeline" in r.stdout


def test_train_rejects_fp16_on_cpu_before_starting():
    r = run(str(BIN / "heygen-ray"), "train", "--config", "configs/train/video_classification.yaml", "precision=fp16")
    assert r.returncode == 2 and "scaling.use_gpu" in r.stderr
