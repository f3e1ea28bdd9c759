"""Sweeps with Ray Tune: stage-agnostic search spaces (`space.py`) and the launcher (`sweep.py`).

Importing this package imports neither ray nor mlflow.
"""

from heygen_ray.tune.space import SearchSpace, check_path, merge

__all__ = ["SearchSpace", "check_path", "merge"]
