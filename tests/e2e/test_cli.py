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


def run(*args, timeout=300, **env_vars):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", **env_vars)
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


def test_a_storage_root_that_cannot_be_written_fails_before_ray_starts(tmp_path):
    (tmp_path / "a_file").write_text("x")
    r = run(str(BIN / "heygen-ray"), "train", "--config", "configs/train/video_classification.yaml",
            f"storage={tmp_path}/a_file/root")
    assert r.returncode == 2 and "storage: cannot write to the storage root" in r.stderr and "a_file/root" in r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout
    r = run(str(BIN / "heygen-ray"), "data", "run", "--config", "configs/data/quickstart.yaml",
            HEYGEN_RAY_STORAGE=f"{tmp_path}/a_file/root")  # the cluster's variable, checked the same way
    assert r.returncode == 2 and "$HEYGEN_RAY_STORAGE: cannot write" in r.stderr


@pytest.mark.slow
def test_data_job_smoke_test_end_to_end(tmp_path):
    """Run from the repository with a storage root: the data (the smoke size's relative data/smoke) lands
    under the root, not beside the code."""
    out = tmp_path / "results.json"
    r = run(sys.executable, "jobs/data.py", "--config", "configs/data/quickstart.yaml", "--smoke-test",
            "--results", str(out), HEYGEN_RAY_STORAGE=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["synth"]["num_clips"] == 32
    splits = res["video"]["splits"]
    assert sum(s["clips"] for s in splits.values()) == 32
    assert all(s["dropped"] == 0 and s["shape"] == [8, 32, 32, 3] for s in splits.values())
    assert res["text"]["sequences"] > 0 and res["text"]["seq_len"] == 64
    assert (tmp_path / "data" / "smoke" / "manifest.parquet").exists()
    assert (tmp_path / "data" / "smoke" / "tokenizer" / "tokenizer.json").exists()
    assert "video pipeline" in r.stdout and "text pipeline" in r.stdout


def test_train_rejects_fp16_on_cpu_before_starting():
    r = run(str(BIN / "heygen-ray"), "train", "--config", "configs/train/video_classification.yaml", "precision=fp16")
    assert r.returncode == 2 and "scaling.use_gpu" in r.stderr
