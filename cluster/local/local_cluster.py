"""A local multi-process Ray cluster on this machine: a head node plus one worker node, token auth on,
and an `mlflow server` beside it.

    python cluster/local/local_cluster.py start [--dir DIR] [--storage STORAGE] [--worker-cpus 4] [--object-store-mb 512]
    python cluster/local/local_cluster.py stop  [--dir DIR]
    python cluster/local/local_cluster.py status [--dir DIR]

(`cluster/local/start.sh` / `stop.sh` and `make cluster-up` / `make cluster-down` call this.)

Everything the cluster owns lives under DIR (default $HEYGEN_RAY_LOCAL_DIR, else /tmp/hr-local-<uid>):
Ray's temp dirs (DIR/ray-head, DIR/ray-worker: logs, sockets, job working dirs), the auth token (DIR/auth_token, mode 600: the cluster
does not use or write ~/.ray/auth_token), `env` (a file to `source` before `ray job submit`) and
`cluster.json` (the ports and the processes started). Every port is a free one picked at start, so the
cluster runs beside any other Ray on the machine.

What jobs write goes to the storage root STORAGE (default $HEYGEN_RAY_STORAGE, else this checkout), never
to the job's temporary copy of the code: every Ray process, and so every submitted job, gets
HEYGEN_RAY_STORAGE (relative run and data paths resolve under it) and MLFLOW_TRACKING_URI, the
tracking server started here (sqlite database and proxied artifacts in STORAGE/runs/mlflow-server/).
The `env` file exports both too, so scripts and `mlflow` commands in a shell that sourced it see the same.

The head runs with 0 CPUs, as on Kubernetes (cluster/kuberay/): tasks, actors and Train workers go to the
worker node. `stop` ends only this cluster's processes: those recorded at start (checked against their
start time, so a reused PID is never signalled), those whose command line names DIR (Ray's workers
started later), and their descendants (job drivers); never a machine-wide `ray stop`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def default_dir() -> Path:
    return Path(os.environ.get("HEYGEN_RAY_LOCAL_DIR") or f"/tmp/hr-local-{os.getuid()}")


def free_ports(n: int) -> List[int]:
    """n distinct free TCP ports (all sockets held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------- /proc
def _stat(pid: int) -> Optional[List[str]]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "


def start_time(pid: int) -> Optional[int]:
    st = _stat(pid)
    return int(st[19]) if st else None  # field 22: starttime in clock ticks since boot


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environ_has(pid: int, entry: bytes) -> bool:
    """Whether `entry` (b"NAME=value") is in the process's environment (False when unreadable)."""
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def all_pids() -> List[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def parents() -> Dict[int, int]:
    out = {}
    for pid in all_pids():
        st = _stat(pid)
        if st:
            out[pid] = int(st[1])
    return out


def cluster_pids(root: Path, recorded: Dict[str, int]) -> Set[int]:
    """This cluster's live processes: recorded ones still the same process, ones naming `root` in their
    command line, ones started with this cluster's environment (HEYGEN_RAY_CLUSTER_DIR: Ray's own
    daemons, such as the client server, detach from the processes that started them), and all their
    descendants."""
    me = os.getpid()
    marker = str(root) + os.sep  # with the separator: /tmp/hr-local-1000 must not match /tmp/hr-local-10001/...
    env_marker = f"{CLUSTER_ENV}={root}".encode()
    found = {int(p) for p, t in recorded.items() if start_time(int(p)) == t}
    found |= {p for p in all_pids() if p != me and (marker in cmdline(p) or environ_has(p, env_marker))}
    ppid = parents()
    children: Dict[int, List[int]] = {}
    for p, pp in ppid.items():
        children.setdefault(pp, []).append(p)
    stack, seen = list(found), set()
    while stack:
        p = stack.pop()
        if p in seen or p == me:
            continue
        seen.add(p)
        stack.extend(children.get(p, []))
    return {p for p in seen if p in ppid}


# ---------------------------------------------------------------------------------------------- start
CLUSTER_ENV = "HEYGEN_RAY_CLUSTER_DIR"  # set only in the cluster's processes (not in the env file users source)


def ray_env(root: Path) -> Dict[str, str]:
    """The environment the cluster's processes (and job drivers, which inherit it) run with."""
    env = dict(os.environ)
    env[CLUSTER_ENV] = str(root)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # `python` in a job entrypoint = this venv
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(root / "auth_token")
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def default_storage() -> Path:
    return Path(os.environ.get("HEYGEN_RAY_STORAGE") or REPO)


def _run(cmd: List[str], env: Dict[str, str], log) -> None:
    log.write(("$ " + " ".join(cmd) + "\n").encode())
    log.flush()
    r = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited with {r.returncode}")


def start(root: Path, worker_cpus: int, object_store_mb: int, storage: Path) -> dict:
    state_path = root / "cluster.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if cluster_pids(root, state.get("pids", {})):
            raise SystemExit(f"a local cluster is already running from {root} (dashboard {state['dashboard']}); "
                             f"stop it first: cluster/local/stop.sh")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    token = root / "auth_token"
    if not token.exists() or not token.read_text().strip():
        token.write_text(secrets.token_hex(32))
    os.chmod(token, 0o600)
    gcs, dash, client, agent_head, agent_worker = free_ports(5)
    env = ray_env(root)
    storage.mkdir(parents=True, exist_ok=True)
    # the tracking server first: every Ray process (and so every job) is started knowing its URI
    from mlflow_server import start_mlflow_server

    try:
        server, tracking_uri = start_mlflow_server(storage / "runs" / "mlflow-server", log_path=root / "mlflow.log", env=env)
    except RuntimeError as err:
        raise SystemExit(f"the MLflow tracking server did not start: {err}")
    env.update(MLFLOW_TRACKING_URI=tracking_uri, HEYGEN_RAY_STORAGE=str(storage))
    ray = str(Path(sys.executable).with_name("ray"))
    store = str(object_store_mb * 1024 * 1024)
    common = ["--object-store-memory", store, "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    state = {"dir": str(root), "gcs_address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}",
             "client": f"ray://127.0.0.1:{client}", "worker_cpus": worker_cpus, "storage": str(storage),
             "mlflow": tracking_uri, "mlflow_pid": server.pid, "pids": {}}
    log_path = root / "start.log"
    with open(log_path, "ab") as log:
        try:
            _run([ray, "start", "--head", "--port", str(gcs), "--num-cpus", "0",
                  "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                  "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_head),
                  "--temp-dir", str(root / "ray-head"), *common], env, log)
            _run([ray, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", str(worker_cpus),
                  "--dashboard-agent-listen-port", str(agent_worker),
                  # its own temp dir: nodes sharing one would share runtime_resources/, and the worker
                  # node's runtime-env agent would delete a job's working_dir under the driver's feet
                  "--temp-dir", str(root / "ray-worker"), *common], env, log)
        except Exception as err:
            # record what did start, so stop.sh can end it
            state["pids"] = {str(p): start_time(p) for p in cluster_pids(root, {str(server.pid): start_time(server.pid)})}
            state_path.write_text(json.dumps(state, indent=2))
            raise SystemExit(f"{err}; see {log_path}. Clean up with cluster/local/stop.sh")
    state["pids"] = {str(p): start_time(p) for p in sorted(cluster_pids(root, {str(server.pid): start_time(server.pid)}))}
    state_path.write_text(json.dumps(state, indent=2))
    (root / "env").write_text(
        "# source this file, then: ray job submit -- python jobs/...\n"
        "# (RAY_API_SERVER_ADDRESS, not RAY_ADDRESS: an http RAY_ADDRESS would also redirect a local ray.init())\n"
        f"export RAY_API_SERVER_ADDRESS={state['dashboard']}\n"
        "export RAY_AUTH_MODE=token\n"
        f"export RAY_AUTH_TOKEN_PATH={token}\n"
        "# where jobs write (runs, checkpoints, data) and the tracking server they log to\n"
        f"export HEYGEN_RAY_STORAGE={storage}\n"
        f"export MLFLOW_TRACKING_URI={tracking_uri}\n")
    return state


# ---------------------------------------------------------------------------------------------- stop
def stop(root: Path, grace_s: float = 5.0) -> List[int]:
    """Terminate this cluster's processes (SIGTERM, then SIGKILL after grace_s); return their PIDs."""
    state_path = root / "cluster.json"
    recorded = json.loads(state_path.read_text()).get("pids", {}) if state_path.exists() else {}
    pids = cluster_pids(root, recorded)
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = cluster_pids(root, recorded) & pids
        alive = {p for p in alive if (_stat(p) or ["Z"])[0] != "Z"}
        if not alive:
            break
        time.sleep(0.2)
    else:
        for p in cluster_pids(root, recorded):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # what Ray started after the first sweep (a worker spawned while stopping) gets the same treatment
    late = cluster_pids(root, recorded) - pids
    for p in late:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for stale in (state_path, root / "env"):
        if stale.exists():
            stale.unlink()
    for sock_dir in (root / "ray-head", root / "ray-worker"):  # sockets, logs; the token stays for the next start
        shutil.rmtree(sock_dir, ignore_errors=True)
    return sorted(pids | late)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["start", "stop", "status"])
    ap.add_argument("--dir", type=Path, default=default_dir(), help="the cluster's own directory (default %(default)s)")
    ap.add_argument("--storage", type=Path, default=default_storage(),
                    help="the storage root jobs write under, and the tracking server's store (default %(default)s)")
    ap.add_argument("--worker-cpus", type=int, default=int(os.environ.get("HEYGEN_RAY_WORKER_CPUS", 4)),
                    help="logical CPUs of the worker node (default 4; Train/Tune/Data tasks need them)")
    ap.add_argument("--object-store-mb", type=int, default=int(os.environ.get("HEYGEN_RAY_OBJECT_STORE_MB", 512)),
                    help="object store per node, MB")
    ap.add_argument("--grace-s", type=float, default=5.0,
                    help="stop: seconds between SIGTERM and SIGKILL (raylet and GCS often need the SIGKILL)")
    args = ap.parse_args(argv)
    root = args.dir.resolve()
    if args.command == "start":
        t0 = time.monotonic()
        state = start(root, args.worker_cpus, args.object_store_mb, args.storage.resolve())
        print(f"local Ray cluster up in {time.monotonic() - t0:.1f} s: head (0 CPUs) + 1 worker node "
              f"({args.worker_cpus:g} CPUs), {len(state['pids'])} processes, token auth on")
        print(f"  dashboard {state['dashboard']}   GCS {state['gcs_address']}   dir {root}")
        print(f"  MLflow    {state['mlflow']}   storage {state['storage']} (jobs write here)")
        print(f"  source {root / 'env'} && ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml "
              f"-- python jobs/train.py --config configs/train/video_classification.yaml --smoke-test")
    elif args.command == "stop":
        pids = stop(root, args.grace_s)
        print(f"stopped the local Ray cluster in {root}: {len(pids)} processes" if pids else
              f"no local Ray cluster running from {root}")
    else:
        state_path = root / "cluster.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        pids = cluster_pids(root, state.get("pids", {}))
        print(json.dumps({**state, "running": bool(pids), "live_pids": sorted(pids)}, indent=2))
        return 0 if pids else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
