#!/usr/bin/env bash
# Stop the local cluster started by start.sh (same --dir / $HEYGEN_RAY_LOCAL_DIR): only its own
# processes (recorded at start, or naming its directory, and their children). Never a machine-wide `ray stop`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
exec "$python" "$here/local_cluster.py" stop "$@"
