"""The end-to-end stage runner. Stages run in the order of ``spec.stages``; each returns a summary."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from heygen_ray.config import PipelineSpec


def run_pipeline(spec: PipelineSpec, *, on_progress: Optional[Callable[[str, int, int], None]] = None) -> Dict[str, Any]:
    from heygen_ray.runtime import init_ray

    init_ray(spec.ray)
    out: Dict[str, Any] = {"name": spec.name, "spec_fingerprint": spec.fingerprint(), "stages": {}, "seconds": {}}
    for stage in spec.stages:
        t0 = time.perf_counter()
        if stage == "data":
            from heygen_ray.data.stage import run_data_stage

            out["stages"]["data"] = run_data_stage(spec.data, on_progress=on_progress)
        out["seconds"][stage] = round(time.perf_counter() - t0, 2)
    return out
