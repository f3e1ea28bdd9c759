"""Shared fixtures: one real local Ray per test session, and small generated data sets."""

from __future__ import annotations

import os

# Only inside tests: no token file in ~/.ray, no usage stats, no duplicated worker prints.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray shared by the whole run (4 logical CPUs on a 2-core machine)."""
    import ray

    from heygen_ray.runtime import init_ray
    from heygen_ray.config import RaySpec

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
