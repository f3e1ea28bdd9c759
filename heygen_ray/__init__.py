"""heygen_ray: train, sweep, compress and serve video and text models on Ray, tracked in MLflow.

Importing the package does nothing: no Ray, no MLflow, no torch until a submodule needs it.
"""

__version__ = "0.1.0"
