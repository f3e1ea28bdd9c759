"""Connecting to Ray: the one place jobs and the CLI start or join a cluster."""

from __future__ import annotations

import logging
import os
from typing import Optional

from heygen_ray.config import RaySpec

log = logging.getLogger(__name__)


def init_ray(spec: Optional[RaySpec] = None, *, quiet: bool = True) -> None:
    """Join the cluster named by ``spec.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else
    start a fresh local Ray with ``spec.num_cpus`` CPUs. A no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    spec = spec or RaySpec()
    address = spec.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": True}
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
