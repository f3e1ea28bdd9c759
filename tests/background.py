"""Long subprocess chains that overlap the rest of the test session.

A test module may define ``background_chain(tmp: pathlib.Path) -> dict``: a chain of subprocesses
(each with its own local Ray and MLflow store) that needs nothing from the session's Ray. The session
starts every such chain, one after another in one thread, when its first test starts
(``tests/conftest.py``), and runs those modules' tests last; the module's fixture takes the chain's
result with ``CHAINS.result(__name__)``, waiting for it if needed. The chains' minutes then fill the
cores the in-process tests leave idle (they keep 2 cores about 80 % busy) instead of adding to the
session's wall time. Chains run their subprocesses through ``CHAINS.run`` so that an interrupted
session kills them instead of waiting for them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple


class Chains:
    def __init__(self) -> None:
        self._futures: Dict[str, Future] = {}
        self._procs: set = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, chains: Sequence[Tuple[str, Callable[[Path], Dict[str, Any]], Path]]) -> None:
        """Run ``fn(tmp)`` for each (name, fn, tmp), in order, in one background thread."""
        todo: List[Tuple[Future, Callable, Path]] = []
        for name, fn, tmp in chains:
            fut: Future = Future()
            self._futures[name] = fut
            todo.append((fut, fn, tmp))

        def work() -> None:
            for fut, fn, tmp in todo:
                if self._stopping:
                    fut.set_exception(RuntimeError("the test session stopped before this chain ran"))
                    continue
                try:
                    fut.set_result(fn(tmp))
                except BaseException as err:  # noqa: BLE001 (re-raised in the test that takes the result)
                    fut.set_exception(err)

        self._thread = threading.Thread(target=work, name="background-chains", daemon=True)
        self._thread.start()

    def result(self, name: str) -> Dict[str, Any]:
        """The chain's result (waits for it); its failure is raised here, in the test that needs it."""
        if name not in self._futures:
            raise RuntimeError(f"no background chain was started for {name} (does it define background_chain?)")
        return self._futures[name].result()

    def run(self, argv: Sequence[str], *, cwd, timeout: float, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``subprocess.run(argv, capture_output=True, text=True)`` in its own process group, killed
        (group and all: its Ray too) on timeout or when the session stops. The process starts its own
        local Ray: no RAY_ADDRESS, auth off (as in the session), one inductor compile thread; ``env``
        adds variables to the session's environment."""
        if self._stopping:
            raise RuntimeError("the test session is stopping")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TORCHINDUCTOR_COMPILE_THREADS": "1", **(env or {})}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        with self._lock:
            self._procs.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise AssertionError(f"{argv[:3]} did not finish in {timeout:.0f} s\n{out[-3000:]}\n{err[-3000:]}") from None
        finally:
            with self._lock:
                self._procs.discard(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop(self, wait_s: float = 60.0) -> None:
        """Kill what still runs (an interrupted session) and wait for the thread."""
        self._stopping = True
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            _kill_group(proc)
        if self._thread is not None:
            self._thread.join(wait_s)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


CHAINS = Chains()  # the session's
