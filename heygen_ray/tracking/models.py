"""Models: safetensors + JSON inside an MLflow pyfunc ("models from code", `pyfunc.py` beside this
file); loading rebuilds the zoo model by name and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

from heygen_ray import uris
from heygen_ray.tracking.runs import NullTracker, Tracker, _client, flatten

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

MODEL_FORMAT = "heygen_ray.model/1"  # model.json "format": bump when the layout changes
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
_PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc.py")

# Inputs whose dimension 1 is a sequence length (the batch contract in heygen_ray/models/__init__.py):
# in a logged model's signature that dimension is variable (-1), like the batch dimension.
_SEQUENCE_INPUTS = frozenset(
    {"input_ids", "attention_mask", "memory", "memory_mask", "text_embeddings", "video_embeddings", "video_mask"}
)
# Input examples larger than this (elements, batch of 1) are not stored with the model (the JSON
# would be huge); the signature is still inferred from them.
MAX_EXAMPLE_ELEMENTS = 100_000




@dataclass(frozen=True)
class LoggedModel:
    """What `log_model` returns. `version` is the registry version as a string ("1", "2", ...;
    MLflow's registry APIs accept it as is) or None when not registered; `model_uri` is the
    MLflow 3 logged-model URI `models:/m-<id>`."""

    model_uri: str
    registered_name: Optional[str]
    version: Optional[str]
    run_id: str
    model_id: str

    @property
    def registry_uri(self) -> Optional[str]:
        """`models:/<name>/<version>` when registered."""
        return uris.model_uri(self.registered_name, version=self.version) if self.registered_name else None


class ModelRef(NamedTuple):
    """A registry reference resolved: (name, version, run_id, source)."""

    name: Optional[str]
    version: Optional[str]
    run_id: Optional[str]
    source: str


def _pip_requirements() -> List[str]:
    """Exact versions of what the pyfunc wrapper imports (no inference: fast, offline; torch's
    local "+cpu" suffix is dropped, as pip indexes do not carry it)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "safetensors", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:  # pragma: no cover
            reqs.append(dist)
    return reqs


def _to_numpy(t: "torch.Tensor"):
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _example_numpy(inputs: Mapping[str, Any]) -> Dict[str, Any]:
    """Batch-1 numpy copies of tensor inputs (None entries dropped)."""
    import numpy as np
    import torch

    out = {}
    for k, v in inputs.items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            out[k] = _to_numpy(v[:1])
        else:
            out[k] = np.asarray(v)[:1]
    return out


def _signature(example: Mapping[str, Any], output: Any, sequence_axes: bool):
    """Tensor signature: batch dim variable; dim 1 of sequence inputs (and of a >=3-d output of a
    model that takes them) variable too."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    specs = []
    for name, arr in example.items():
        shape = [-1, *arr.shape[1:]]
        if name in _SEQUENCE_INPUTS and len(shape) >= 2:
            shape[1] = -1
        specs.append(TensorSpec(arr.dtype, tuple(shape), name))
    out_shape = [-1, *output.shape[1:]]
    if sequence_axes and len(out_shape) >= 3:
        out_shape[1] = -1
    return ModelSignature(inputs=Schema(specs), outputs=Schema([TensorSpec(output.dtype, tuple(out_shape))]))


def _float_dtype(module: "nn.Module") -> Optional[str]:
    for p in module.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return None


def model_config(
    m: "nn.Module", model_name: str, overrides: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """model.json of a zoo model: what rebuilds it by name (plus the widths of a pruned one)."""
    import torch

    import heygen_ray

    config = {
        "format": MODEL_FORMAT,
        "registry_name": model_name,
        "overrides": dict(overrides),
        "class": type(m).__name__,
        "input_names": list(m.input_names),
        "num_classes": int(m.num_classes),
        "num_features": int(getattr(m, "num_features", 0) or 0),
        "dtype": _float_dtype(m),
        "heygen_ray_version": heygen_ray.__version__,
        "torch_version": torch.__version__,
        "extra": dict(extra or {}),
    }
    arch = getattr(m, "heygen_architecture", None)  # a pruned model: its widths differ from the preset
    if arch:
        config["architecture"] = arch
    return config


def save_model_dir(path: str, model: "nn.Module", *, model_name: str, model_overrides: Optional[Mapping[str, Any]] = None,
                   extra: Optional[Mapping[str, Any]] = None) -> str:
    """The files of a logged model (artifacts/model.json + artifacts/model.safetensors) in a local
    directory, without MLflow: `load_model(path)` reads it back (a hand-off between processes)."""
    import safetensors.torch

    from heygen_ray.models import unwrap_model

    m = unwrap_model(model)
    root = os.path.join(path, "artifacts")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, CONFIG_FILE), "w") as f:
        json.dump(model_config(m, model_name, dict(model_overrides or {}), extra), f, indent=2, sort_keys=True)
    safetensors.torch.save_model(m, os.path.join(root, WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def log_model(
    tracker: Union[Tracker, NullTracker],
    model: "nn.Module",
    *,
    model_name: str,
    model_overrides: Optional[Mapping[str, Any]] = None,
    registered_model_name: Optional[str] = None,
    input_example: Optional[Mapping[str, "torch.Tensor"]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    name: str = "model",
    step: int = 0,
    version_tags: Optional[Mapping[str, str]] = None,
    await_registration_s: int = 300,
) -> Optional[LoggedModel]:
    """Log `model` (a zoo model, or DDP/compiled wrapper of one) to the tracker's run as a pyfunc
    model, and register it as a new version of `registered_model_name` when given.

    `model_name`/`model_overrides` must rebuild the architecture: `create_model(model_name,
    **model_overrides)`; a head resized with `reset_classifier` is recorded (num_classes) and
    redone on load. `input_example` (default: `model.example_inputs(1)`) gives the signature; it is
    stored (batch 1) unless larger than MAX_EXAMPLE_ELEMENTS. `extra` (JSON-able: label names,
    tokenizer path, precision, variant, lineage...) lands in model.json. Weights are saved from any
    device; the model's train/eval mode is left as it was. Returns None on a NullTracker.
    """
    if not isinstance(tracker, Tracker):
        return None
    import mlflow.pyfunc
    import safetensors.torch
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from heygen_ray.models import unwrap_model

    m = unwrap_model(model)
    overrides = dict(model_overrides or {})
    config = model_config(m, model_name, overrides, extra)
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"log_model: model_overrides and extra must be JSON-serialisable ({e})") from None

    inputs = dict(input_example) if input_example is not None else m.example_inputs(1)
    example = _example_numpy(inputs)
    unknown = sorted(set(example) - set(m.input_names))
    if unknown:
        raise ValueError(f"log_model: input_example has {unknown}, which {type(m).__name__} does not take "
                         f"(inputs: {list(m.input_names)})")
    was_training = m.training
    m.eval()
    try:
        output = _predict_numpy(m, example)
    finally:
        m.train(was_training)
    signature = _signature(example, output, sequence_axes=any(k in _SEQUENCE_INPUTS for k in example))
    stored_example = example if sum(a.size for a in example.values()) <= MAX_EXAMPLE_ELEMENTS else None

    client = tracker.client
    run_id = tracker._rid()
    lm = client.create_logged_model(
        experiment_id=tracker.experiment_id,
        name=name,
        source_run_id=run_id,
        params=flatten({"registry_name": model_name, "overrides": overrides}),
        tags={"heygen_ray.model_format": MODEL_FORMAT},
        model_type="heygen_ray",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="heygen_ray_model_") as tmp:
            files = os.path.join(tmp, "files")
            os.makedirs(files)
            weights = os.path.join(files, WEIGHTS_FILE)
            safetensors.torch.save_model(m, weights, metadata={"format": "pt"})  # dedups tied weights
            cfg_path = os.path.join(files, CONFIG_FILE)
            with open(cfg_path, "w") as f:
                f.write(config_text)
            local = os.path.join(tmp, "model")
            mlflow_model = Model(artifact_path=lm.artifact_location, run_id=run_id, model_uuid=lm.model_id,
                                 model_id=lm.model_id)
            mlflow.pyfunc.save_model(
                path=local,
                python_model=_PYFUNC_CODE,
                artifacts={"weights": weights, "config": cfg_path},
                signature=signature,
                input_example=stored_example,
                pip_requirements=_pip_requirements(),
                metadata={"heygen_ray": {k: config[k] for k in ("format", "registry_name", "class", "num_classes")}},
                mlflow_model=mlflow_model,
            )
            client.log_model_artifacts(lm.model_id, local)
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=step)])
        client.finalize_logged_model(lm.model_id, "READY")
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(lm.model_id, "FAILED")
        raise

    model_uri = uris.model_uri(lm.model_id)
    version = None
    if registered_model_name:
        version = _register_version(client, tracker.tracking_uri, registered_model_name, lm, run_id,
                                    version_tags, await_registration_s)
    return LoggedModel(model_uri, registered_model_name, version, run_id, lm.model_id)


def _register_version(client, tracking_uri: str, name: str, lm, run_id: str,
                      version_tags: Optional[Mapping[str, str]], await_s: int) -> str:
    """A new version of registered model `name` for logged model `lm`; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # A tracking server resolves a `models:/m-<id>` source itself. A local SQL registry looks
    # the logged model up through a *global* MlflowClient() (TODO in mlflow/store/model_registry/
    # sqlalchemy_store.py create_model_version), i.e. the wrong store unless the process-wide
    # URI happens to match: there, register the storage location directly (the version's
    # `heygen_ray.model_id` tag keeps the link to the logged model).
    remote = tracking_uri.split(":", 1)[0].lower() in ("http", "https")
    mv = client.create_model_version(
        name, source=uris.model_uri(lm.model_id) if remote else lm.artifact_location, run_id=run_id,
        model_id=lm.model_id, tags={"heygen_ray.model_id": lm.model_id, **dict(version_tags or {})},
        await_creation_for=await_s,
    )
    return str(mv.version)


def register_run_model(tracking_uri: str, run_id: str, name: str, *, version_tags: Optional[Mapping[str, str]] = None,
                       await_registration_s: int = 300) -> LoggedModel:
    """Register the (last) model logged by run `run_id` as a new version of `name`, e.g. the best
    trial of a sweep, whose trials log their models without registering them."""
    client = _client(tracking_uri)
    outputs = client.get_run(run_id).outputs
    model_ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    if not model_ids:
        raise ValueError(f"run {run_id} at {tracking_uri} logged no model to register")
    lm = client.get_logged_model(model_ids[-1])
    version = _register_version(client, tracking_uri, name, lm, run_id, version_tags, await_registration_s)
    return LoggedModel(uris.model_uri(lm.model_id), name, version, run_id, lm.model_id)


def set_alias(name: str, alias: str, version: Union[str, int], *, tracking_uri: Optional[str] = None) -> None:
    """Point `models:/<name>@<alias>` at `version` (moves the alias if it exists)."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


def resolve_model_uri(uri: str, *, tracking_uri: Optional[str] = None) -> ModelRef:
    """`models:/name@alias`, `models:/name/<version>` or `models:/m-<id>` -> ModelRef(name, version,
    run_id, source). A logged model that is not registered gives name = version = None."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise ValueError(f"not a models:/ URI: {uri!r} (expected models:/<name>@<alias>, "
                         "models:/<name>/<version> or models:/<model_id>)")
    client = _client(tracking_uri)
    name, alias, version = match.group("name", "alias", "version")
    if alias is not None:
        mv = client.get_model_version_by_alias(name, alias)
    elif version is not None:
        mv = client.get_model_version(name, version)
    else:
        lm = client.get_logged_model(name)
        return ModelRef(None, None, lm.source_run_id, uri)
    return ModelRef(mv.name, str(mv.version), mv.run_id, mv.source)


def _load_from_files(config_path: str, weights_path: str, map_location: Union[str, "torch.device"] = "cpu"):
    """(model in eval mode, config) from a model.json + model.safetensors pair. No pickle: the
    architecture comes from the registry, the tensors from safetensors."""
    import torch
    from safetensors import safe_open

    from heygen_ray.models import create_model

    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{config_path}: unsupported model format {config.get('format')!r} (expected {MODEL_FORMAT})")
    model = create_model(config["registry_name"], **config.get("overrides", {}))
    if int(config.get("num_classes", model.num_classes)) != model.num_classes:
        model.reset_classifier(int(config["num_classes"]))
    if config.get("architecture"):  # pruned: reshape the preset to the recorded widths first
        from heygen_ray.models.architecture import apply_architecture

        apply_architecture(model, config["architecture"])
    if config.get("dtype"):
        dtype = getattr(torch, str(config["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{config_path}: unknown dtype {config['dtype']!r}")
        model.to(dtype)
    with safe_open(weights_path, framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        aliases = f.metadata() or {}
    # safetensors.torch.save_model stores a tied/shared tensor once and records
    # {dropped name: kept name} in the metadata: restore the dropped names from the kept tensor.
    for dropped, kept in aliases.items():
        if dropped not in state and kept in state:
            state[dropped] = state[kept]
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model, config


def _predict_numpy(model: "nn.Module", model_input: Any):
    """Run `model` on a dict of numpy arrays (or one array for a single-input model) -> numpy."""
    import numpy as np
    import torch

    names = list(model.input_names)
    if not isinstance(model_input, Mapping):
        if hasattr(model_input, "to_dict") and not isinstance(model_input, np.ndarray):  # a DataFrame
            raise TypeError("pass a dict of numpy arrays keyed by input name (tensor signature)")
        model_input = {names[0]: model_input}
    unknown = sorted(set(model_input) - set(names))
    if unknown:
        raise ValueError(f"unknown inputs {unknown}; the model takes {names}")
    device = next(model.parameters()).device
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = {}
    for k, v in model_input.items():
        t = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        tensors[k] = t.to(float_dtype) if t.is_floating_point() else t
    with torch.inference_mode():
        return _to_numpy(model(**tensors))


def _storage_uri(uri: str, tracking_uri: Optional[str]) -> str:
    """Where the files of a `models:/` URI live, looked up through our client. (MLflow's own
    `models:/` artifact repository resolves names through the *global* registry URI and ignores
    the `tracking_uri`/`registry_uri` given to `download_artifacts`: models_artifact_repo.py
    `_get_model_uri_infos`.)"""
    match = _MODELS_URI.match(uri)
    if not match:
        return uri
    client = _client(tracking_uri)
    name, alias, version = match.group("name", "alias", "version")
    if alias is None and version is None:
        return client.get_logged_model(name).artifact_location
    if alias is not None:
        version = client.get_model_version_by_alias(name, alias).version
    return client.get_model_version_download_uri(name, str(version))


def _download_model_dir(uri: str, tracking_uri: Optional[str], dst: str) -> str:
    """A local directory holding the pyfunc model of `uri` (downloaded into `dst` if remote)."""
    if os.path.isdir(uri):
        return uri
    source = _storage_uri(uri, tracking_uri)
    local = source[len("file://"):] if source.startswith("file://") else source
    if "://" not in local and os.path.isdir(local):
        return local
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri)


def load_model_and_config(
    uri: str, map_location: Union[str, "torch.device"] = "cpu", *, tracking_uri: Optional[str] = None
) -> Tuple["nn.Module", Dict[str, Any]]:
    """(model, model.json dict) from `models:/name@alias`, `models:/name/<version>`,
    `models:/m-<id>`, an artifact URI of the model directory, or a local model directory."""
    with tempfile.TemporaryDirectory(prefix="heygen_ray_load_") as tmp:
        root = _download_model_dir(uri, tracking_uri, tmp)
        config_path = os.path.join(root, "artifacts", CONFIG_FILE)
        weights_path = os.path.join(root, "artifacts", WEIGHTS_FILE)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise FileNotFoundError(f"{uri} is not a heygen_ray model (no artifacts/{CONFIG_FILE} + {WEIGHTS_FILE})")
        return _load_from_files(config_path, weights_path, map_location)


def load_model(uri: str, map_location: Union[str, "torch.device"] = "cpu", *, tracking_uri: Optional[str] = None) -> "nn.Module":
    """The logged model as its own class (eval mode), rebuilt by name and loaded from safetensors."""
    return load_model_and_config(uri, map_location, tracking_uri=tracking_uri)[0]


def load_pyfunc(uri: str, *, tracking_uri: Optional[str] = None):
    """`mlflow.pyfunc.load_model` for `uri` resolved through `tracking_uri` (not the global URI):
    `.predict({input_name: numpy array})` -> numpy array."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="heygen_ray_pyfunc_") as tmp:
        # load_context reads the weights into memory, so the download can go afterwards
        return mlflow.pyfunc.load_model(_download_model_dir(uri, tracking_uri, tmp))


# --------------------------------------------------------------------------------------------------
# For serving: a model's model.json alone, a run's artifact, a variant's version
# --------------------------------------------------------------------------------------------------


def load_model_config(uri: str, *, tracking_uri: Optional[str] = None) -> Dict[str, Any]:
    """The model.json of `uri` (any form `load_model_and_config` takes), without building the model."""
    with tempfile.TemporaryDirectory(prefix="heygen_ray_config_") as tmp:
        root = _download_model_dir(uri, tracking_uri, tmp)
        path = os.path.join(root, "artifacts", CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{uri} is not a heygen_ray model (no artifacts/{CONFIG_FILE})")
        with open(path) as f:
            return json.load(f)


def recorded(config: Mapping[str, Any], key: str, *, tracking_uri: Optional[str] = None, depth: int = 0) -> Any:
    """What a logged model's model.json records under ``extra.<key>`` (training's ``task``,
    ``data_info``, ...); a compressed variant that does not carry it is followed to its parent
    (``extra.lineage.parent_uri``). None when nothing records it."""
    extra = config.get("extra") or {}
    if extra.get(key) not in (None, {}, ""):
        return extra[key]
    parent = (extra.get("lineage") or {}).get("parent_uri")
    if depth < 3 and isinstance(parent, str) and uris.is_model_uri(parent):
        try:
            parent_config = load_model_config(parent, tracking_uri=tracking_uri)
        except Exception as err:  # noqa: BLE001 - the parent may be gone: callers fill the gaps
            log.warning("%s of parent %s unavailable: %s", key, parent, err)
            return None
        return recorded(parent_config, key, tracking_uri=tracking_uri, depth=depth + 1)
    return None


def recorded_data_info(config: Mapping[str, Any], *, tracking_uri: Optional[str] = None) -> Dict[str, Any]:
    """The DataInfo (classes, label names, clip shape, tokenizer, ...) a logged model was trained on
    (``recorded(config, "data_info")``), {} when nothing records it."""
    return dict(recorded(config, "data_info", tracking_uri=tracking_uri) or {})


def download_run_artifact(run_id: str, path: str, dst_dir: str, *, tracking_uri: Optional[str] = None) -> str:
    """Download artifact `path` of run `run_id` into `dst_dir`; returns the local file path."""
    return _client(tracking_uri).download_artifacts(run_id, path, dst_dir)


def find_variant_version(name: str, variant: str, *, tracking_uri: Optional[str] = None) -> Optional[str]:
    """The newest version of registered model `name` tagged `heygen_ray.variant=<variant>` (what the
    compression stage registers for each variant), or None."""
    client = _client(tracking_uri)
    safe_name, safe_variant = name.replace("'", ""), variant.replace("'", "")
    versions = client.search_model_versions(f"name='{safe_name}' and tags.`heygen_ray.variant`='{safe_variant}'")
    if not versions:
        return None
    return str(max(int(v.version) for v in versions))
