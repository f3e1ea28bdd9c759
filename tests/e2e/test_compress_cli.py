"""`jobs/compress.py --smoke-test` exactly as a user runs it (a subprocess with its own local Ray)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args, timeout=900):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TORCHINDUCTOR_COMPILE_THREADS="1")
    return subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_compress_config_fails_before_ray_starts():
    r = run(str(BIN / "heygen-ray"), "compress", "--config", "configs/compress/video_classifier.yaml", "prune.ratio=1.5")
    assert r.returncode == 2 and "prune.ratio" in r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout


@pytest.mark.slow
def test_compress_job_smoke_test_end_to_end(tmp_path):
    r = run(sys.executable, "jobs/compress.py", "--config", "configs/compress/video_classifier.yaml", "--smoke-test",
            f"run_dir={tmp_path}/runs", f"train.data.synth.output_dir={tmp_path}/data")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "runs" / "video_classifier" / "results.json").read_text())
    variants = [v["variant"] for v in res["variants"]]
    # the shipped config measures every reference variant (the compiled fp32 student is tested only here)
    assert variants == ["teacher_fp32", "teacher_bf16", "pruned", "pruned_distilled", "pruned_distilled_bf16",
                        "pruned_distilled_compiled", "pruned_distilled_int8_static", "unstructured_control"]
    assert len(res["versions"]) == len(variants)  # every variant registered
    assert (res["alias_variant"] is None or res["alias_variant"] in variants) and "results.json" in r.stdout.replace("\n", "")
    assert res["prune"]["params_after"] < res["prune"]["params_before"]
