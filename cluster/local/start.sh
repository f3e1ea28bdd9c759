#!/usr/bin/env bash
# Start a local multi-process Ray cluster (head with 0 CPUs + one worker node, token auth on, free ports,
# everything under $HEYGEN_RAY_LOCAL_DIR or /tmp/hr-local-<uid>). Then:
#   source /tmp/hr-local-$(id -u)/env
#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config ... --smoke-test
# Options: --dir DIR --worker-cpus N --object-store-mb MB. Stop it with cluster/local/stop.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
exec "$python" "$here/local_cluster.py" start "$@"
