#!/usr/bin/env bash
# Run a command as a driver of the local cluster (started here when it is not running):
#   cluster/local/with_cluster.sh .venv/bin/heygen-ray pipeline run --config configs/pipeline/quickstart.yaml
# The driver joins through RAY_ADDRESS (the GCS) with the cluster's token; what it deploys on Serve
# outlives it. `make demo` uses this; stop the cluster (and Serve) with `make stop`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
cluster=("$python" "$here/local_cluster.py")
if ! "${cluster[@]}" status >/dev/null 2>&1; then
  "${cluster[@]}" start
fi
state="$("${cluster[@]}" status)"
dir="$(printf '%s' "$state" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["dir"])')"
gcs="$(printf '%s' "$state" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["gcs_address"])')"
set -a
# shellcheck disable=SC1091
. "$dir/env"
set +a
export RAY_ADDRESS="$gcs"
exec "$@"
