"""`ray job submit -- python jobs/tune.py --config configs/sweep/lr_schedule.yaml [--smoke-test] [k=v ...]`

Runs a Ray Tune sweep (one TorchTrainer per trial), tracked in MLflow as a parent run with a child run
per trial; registers the best trial's model; writes <run_dir>/<name>/best_config.yaml and
results.json and prints their paths. Exits non-zero if the config is invalid or no trial completed.
With `stage: compress` (configs/sweep/compress_video_classifier.yaml) each trial is a compression job
on one shared teacher, reporting the final variant's quality and latency (no registration).
"""

import sys

from heygen_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["tune", *sys.argv[1:]]))
