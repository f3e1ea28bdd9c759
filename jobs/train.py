"""`ray job submit -- python jobs/train.py --config configs/train/video_classification.yaml [--smoke-test] [k=v ...]`

Trains on Ray Train (DDP), tracked in MLflow; writes <run_dir>/<name>/results.json and prints its path.
Re-running with the same name resumes from the latest checkpoint. Exits non-zero on failure.
"""

import sys

from heygen_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["train", *sys.argv[1:]]))
