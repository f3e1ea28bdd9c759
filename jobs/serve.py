"""`ray job submit -- python jobs/serve.py --config configs/serve/quickstart.yaml [--smoke-test] [k=v ...]`

Deploy the Serve app (models loaded from the MLflow registry by alias) on the current Ray and keep
serving; with --smoke-test: deploy, send one request per endpoint, print the report, shut down.
Exits non-zero on failure.
"""

import sys

from heygen_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["serve", *sys.argv[1:]]))
