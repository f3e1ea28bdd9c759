"""`ray job submit -- python jobs/compress.py --config configs/compress/video_classifier.yaml [--smoke-test] [k=v ...]`

Prune -> distill (Ray Train) -> quantize a trained model; every variant measured, reported and
registered in MLflow; writes <run_dir>/<name>/results.json and prints its path. Exits non-zero on failure.
"""

import sys

from heygen_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["compress", *sys.argv[1:]]))
