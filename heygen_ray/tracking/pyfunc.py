"""The MLflow pyfunc wrapper of every heygen_ray model, logged as "models from code".

MLflow copies this file into each logged model and executes it (under a module name of its own)
when the model is saved and loaded; it then picks up the object passed to `set_model`. Nothing
is cloudpickled: the wrapper rebuilds the model from the logged `model.json` (registry name +
overrides) and its `model.safetensors` weights, through `heygen_ray.tracking`.

Imported as `heygen_ray.tracking.pyfunc` (for instance by a tool that imports every module of the
package) it does nothing: no mlflow import, no registration.
"""

_PACKAGE_MODULE_NAME = "heygen_ray.tracking.pyfunc"


def _make_python_model():
    """The PythonModel instance MLflow serves: predict(dict of numpy arrays) -> numpy array."""
    import numpy as np
    from mlflow.pyfunc import PythonModel

    class HeygenRayPyfunc(PythonModel):
        def load_context(self, context):
            from heygen_ray.tracking.models import _load_from_files

            self.model, self.config = _load_from_files(
                context.artifacts["config"], context.artifacts["weights"], map_location="cpu"
            )

        # `np.ndarray` is one of the hints MLflow infers no schema from (mlflow/types/type_hints.py
        # type_hints_no_signature_inference): the tensor signature is logged explicitly, and a
        # multi-input model receives a dict of arrays keyed by input name.
        def predict(self, context, model_input: np.ndarray, params=None):
            from heygen_ray.tracking.models import _predict_numpy

            return _predict_numpy(self.model, model_input)

    return HeygenRayPyfunc()


if __name__ != _PACKAGE_MODULE_NAME:  # executed by MLflow (save/load), not imported by the package
    import mlflow.models

    mlflow.models.set_model(_make_python_model())
