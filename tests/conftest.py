"""Shared fixtures: one real local Ray per test session, and small generated data sets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# cluster/local/: the local cluster's scripts and the `mlflow server` starter the session fixture shares
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster" / "local"))
# Hermetic: a developer's shell that sourced a cluster's env file must not send tests to that cluster's
# storage root or tracking server.
for _var in ("HEYGEN_RAY_STORAGE", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)

# Only inside tests: no token file in ~/.ray, no usage stats, no duplicated worker prints.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Ray Train's controller polls its workers every 2 s by default, so each run ends up to 2 s after its
# workers have; the suite runs ~50 of them. Set before Ray starts: its processes inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# No test drains a node, and none reads Ray Train's Prometheus metrics: without the preemption watcher
# (one more actor process per run) and the metrics callbacks, an empty 1-worker run used 14.5 instead
# of 16.5 CPU-seconds (mean of six, on 2 cores the suite is CPU-bound). Product runs keep both.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")

import pytest  # noqa: E402  (after the environment above, which Ray must see)
from background import CHAINS  # noqa: E402  (tests/background.py)


def _chain_modules(items):
    """The modules of ``items`` that define ``background_chain``, in collection order."""
    seen = {}
    for item in items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "background_chain"):
            seen.setdefault(mod.__name__, mod)
    return list(seen.values())


def pytest_collection_modifyitems(session, config, items):
    """The tests of modules with a background chain run last (in collection order, as their chains
    run), so the chains overlap everything else (tests/background.py)."""
    names = {m.__name__ for m in _chain_modules(items)}
    items.sort(key=lambda i: getattr(getattr(i, "module", None), "__name__", None) in names)  # stable: order kept


@pytest.fixture(scope="session", autouse=True)
def _background_chains(request, tmp_path_factory, _hermetic_cache):
    """Start the selected modules' background chains when the session's first test starts (after the
    hermetic cache is set: the chains' subprocesses inherit it); kill what still runs at the end."""
    mods = _chain_modules(request.session.items)
    CHAINS.start([(m.__name__, m.background_chain, tmp_path_factory.mktemp(m.__name__.rsplit(".", 1)[-1])) for m in mods])
    yield CHAINS
    CHAINS.stop()


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """The per-user cache (the empty MLflow store that new sqlite stores are copied from) lives in this
    session's temp folder: nothing outside it is read or written. Set before Ray starts, so workers and
    job subprocesses inherit it."""
    os.environ["HEYGEN_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray shared by the whole run (4 logical CPUs on a 2-core machine)."""
    import ray

    from heygen_ray.config import RaySpec
    from heygen_ray.runtime import init_ray

    # Workers import functions defined in test modules by name: let them find those modules.
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [os.path.join(here, d) for d in ("unit", "integration", "e2e")]
    os.environ["PYTHONPATH"] = os.pathsep.join(dirs + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    init_ray(RaySpec(num_cpus=4, object_store_memory_mb=512))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """48 generated clips (16 frames, 64x64) with manifest and corpus, rendered in-process."""
    from heygen_ray.config import SynthSpec
    from heygen_ray.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    spec = SynthSpec(output_dir=str(out), num_clips=48, seed=3)
    return spec, generate_dataset(spec, use_ray=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI of a real MLflow tracking server (sqlite backend, proxied artifacts), one for the whole test
    session, stopped at the end. Tests that share it use their own experiment and model names."""
    from mlflow_server import running_mlflow_server

    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch with one intra-op thread for a module (what a 1-CPU Ray worker gets), restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _no_thread_count_leaks(request):
    """A test that changes torch's thread count for the rest of the run fails, naming itself (the
    count is restored, so later tests are not affected)."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is None or before is None or "one_torch_thread" in request.fixturenames:
        return
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"{request.node.nodeid} left torch.get_num_threads() at {after} (was {before})", pytrace=False)
