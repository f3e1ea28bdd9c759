"""Connecting to Ray and choosing where results go: the one place jobs and the CLI start or join a
cluster and set the storage root."""

from __future__ import annotations

import logging
import os
from typing import Optional

from heygen_ray import fsutil
from heygen_ray.config import ConfigError, RaySpec

log = logging.getLogger(__name__)


def init_ray(spec: Optional[RaySpec] = None, *, quiet: bool = True) -> None:
    """Join the cluster named by ``spec.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else
    start a fresh local Ray with ``spec.num_cpus`` CPUs. A no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    spec = spec or RaySpec()
    address = spec.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": spec.log_to_driver}
    if address:
        ray.init(address=address, **kwargs)
    else:
        extra = {}
        if spec.object_store_memory_mb:
            extra["object_store_memory"] = spec.object_store_memory_mb * 1024 * 1024
        ray.init(address="local", num_cpus=spec.num_cpus, **extra, **kwargs)
    if quiet:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    if not spec.log_to_driver:
        quiet_console()


def use_storage(storage: Optional[str] = None) -> Optional[str]:
    """Make ``storage`` (a spec's ``storage`` field; default ``$HEYGEN_RAY_STORAGE``) this process's
    storage root, after checking that it can be created and written: relative run, output and data
    paths then resolve under it (:func:`heygen_ray.fsutil.absolute`). Returns the absolute root, or
    None when neither is set (paths stay relative to the current directory). A root that cannot be
    used fails here, naming it, before Ray or any worker starts."""
    field = "storage" if storage else f"${fsutil.STORAGE_ENV}"
    root = storage or fsutil.storage_root()
    if not root:
        return None
    if fsutil.has_scheme(root):
        raise ConfigError(f"{field}: {root!r}: the storage root must be a local or shared (e.g. NFS) directory; "
                          "object-store roots (s3://, gs://) are not supported yet")
    path = os.path.abspath(os.path.expanduser(root[len("file://"):] if root.startswith("file://") else root))
    probe = os.path.join(path, f".heygen_ray-write-check-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{field}: cannot write to the storage root {root!r}: {err.strerror or err}") from None
    os.environ[fsutil.STORAGE_ENV] = path
    return path


def require_ray(caller: str) -> None:
    """Fail with a clear message when Ray is not initialised. Library entry points (``run_pipeline``,
    ``serve.deploy``, ``run_sweep``, ``run_training``...) join whatever Ray this process already
    joined; connecting is the job of the program that calls them: the CLI (and so ``jobs/*.py``)
    calls :func:`init_ray` with the spec's ``ray`` section, a Python user calls it (or ``ray.init``)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{caller}: Ray is not initialised; call heygen_ray.runtime.init_ray(spec.ray) "
                           "(or ray.init) first, as the heygen-ray CLI does")


_QUIET = False


def quiet_console() -> None:
    """Keep this process's console for progress: the libraries' info chatter, MLflow's download bars
    and Tune's trial tables off (errors still show; the workers' logs stay in Ray's log folder)."""
    global _QUIET
    _QUIET = True
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    for name in ("ray.serve", "ray.train", "ray.tune", "mlflow", "torchao"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "no available CPUs, the Dataset job will hang" fires while the previous stage's decoders wind down
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def console_is_quiet() -> bool:
    """True after :func:`quiet_console` (``ray.log_to_driver: false``): callers print less."""
    return _QUIET
