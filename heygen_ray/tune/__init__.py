"""Sweeps with Ray Tune.

- ``space.py``: stage-agnostic search spaces over any spec class;
- ``stage.py``: what a sweepable stage provides (:class:`~heygen_ray.tune.stage.Stage`, the plan) and the
  helpers the stages share (trial configs, stop requests);
- ``train.py`` / ``compress.py``: the stage adapters (a training job / a compression job per trial);
- ``result.py``: :class:`~heygen_ray.tune.result.SweepResult`, what a sweep returns;
- ``sweep.py``: the launcher (plan, resources, the Tuner, the summary), which picks the adapter.

Imports go one way: space <- stage <- {train, compress} <- sweep; result stands alone.
Importing this package imports neither ray nor mlflow.
"""

from heygen_ray.tune.space import SearchSpace, check_path, merge

__all__ = ["SearchSpace", "check_path", "merge"]
