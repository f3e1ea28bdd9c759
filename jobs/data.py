"""`ray job submit -- python jobs/data.py --config configs/data/quickstart.yaml [--smoke-test] [k=v ...]`

Generates the embedded set if absent and runs the video and text pipelines; writes results.json.
"""

import sys

from heygen_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["data", "run", *sys.argv[1:], "--results", "results.json"] if "--results" not in sys.argv
                 else ["data", "run", *sys.argv[1:]]))
