"""A real `mlflow server`: sqlite backend + proxied artifacts under one folder, on a free port.

    proc, uri = start_mlflow_server(folder)            # the local cluster's (local_cluster.py): long-lived
    with running_mlflow_server(tmp_dir) as uri:        # the test session's (tests/conftest.py)
        ...

The server runs in its own process group (uvicorn spawns workers), which `stop_mlflow_server` terminates
as a whole (SIGTERM, then SIGKILL after a grace period). Startup is bounded; on failure the error carries
the server's log.

MLflow's server-side job runner (a supervisor and seven huey consumer processes, for its GenAI features:
scorers, prompt optimisation, trace roll-ups) is off: nothing here uses it, and on 2 cores it doubled
the server's start (15 instead of 6 CPU-seconds, 10 processes instead of 2). `jobs=True` turns it on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

STARTUP_TIMEOUT_S = 180.0  # a loaded 2-core machine took over 60 s (uvicorn start after the DB migration)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_cli() -> str:
    """The `mlflow` script of the running interpreter's environment (the project venv)."""
    return str(Path(sys.executable).with_name("mlflow"))


def stop_mlflow_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group: the CLI and its uvicorn workers
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace_s)


def start_mlflow_server(root: Path, timeout_s: float = STARTUP_TIMEOUT_S, log_path: Optional[Path] = None,
                        env: Optional[Dict[str, str]] = None, port: Optional[int] = None,
                        jobs: bool = False) -> Tuple[subprocess.Popen, str]:
    """Start `mlflow server` with its database (root/mlflow.db) and artifacts (root/artifacts) under
    `root` (on `port`, default a free one), wait until /health answers; (process, "http://127.0.0.1:<port>").
    ``jobs``: MLflow's job runner (off by default: see the module's docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = log_path or root / "server.log"
    cmd = [
        _mlflow_cli(), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
        # the default allowed hosts already include localhost/127.0.0.1 on any port; explicit here
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]
    base = env if env is not None else os.environ
    server_env = {k: v for k, v in base.items() if not k.startswith("MLFLOW_")}  # the server's own config only
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if jobs else "false"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, uri
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
    except BaseException:
        stop_mlflow_server(proc)
        raise


@contextmanager
def running_mlflow_server(root: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Start `mlflow server` with its state under `root`; yield its URI; stop it (and its children)."""
    proc, uri = start_mlflow_server(root, timeout_s)
    try:
        yield uri
    finally:
        stop_mlflow_server(proc)
