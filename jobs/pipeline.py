"""`ray job submit -- python jobs/pipeline.py --config configs/pipeline/quickstart.yaml [--smoke-test] [k=v ...]`

Runs the pipeline's stages in order; writes <output_dir>/results.json (or --results PATH).
"""

import sys

from heygen_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["pipeline", "run", *sys.argv[1:]]))
