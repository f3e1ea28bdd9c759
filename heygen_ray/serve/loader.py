"""Registry URI -> a runnable model + its lineage, for every variant the project produces.

    runnable, info = load_variant("models:/video-cls@champion", tracking_uri=uri)
    logits = runnable(**inputs)                 # same keyword inputs as the training model
    info  # {"name", "version", "alias", "run_id", "variant", "precision", "model_name", "task", "data_info", ...}

What a registered version holds (see `heygen_ray.tracking.models` and `compress.stage._log_variant`):
  * fp32 / bf16 models: model.json + model.safetensors (the dtype recorded in model.json).
  * int8 variants of the compression stage: the registry version holds their fp32 source weights;
    model.json ``extra.int8_artifact`` names the file the variant runs from, stored as the run
    artifact ``variant/<file>``:
      - ``int8_dynamic.pt``: a torchao state dict, read with ``torch.load(weights_only=True)`` into
        a freshly quantized copy of the architecture (`compress.quantize.load_int8_dynamic`);
      - ``model.pt2``: the PT2E graph, read with ``torch.export.load`` and run through
        `compress.quantize.compile_frozen`. ``torch.export.load`` may fall back to pickle: only
        files from the project's own registry are read here (the loader takes registry URIs, not
        user paths).
Nothing else is unpickled: the architecture is rebuilt by name, weights come from safetensors.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Dict, Optional, Tuple

from heygen_ray.uris import is_model_uri, model_uri, parse_model_uri

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


def _split(uri: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    ref = parse_model_uri(uri)
    return ref.name, ref.alias, ref.version


def resolve_variant_uri(base_uri: str, value: str, *, tracking_uri: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """A variants-map entry -> (URI to load, precision to cast to or None).

    ``value`` is a ``models:/`` URI; a precision (``fp32``/``bf16``: the base model cast at load);
    or a compression variant name registered under the base model's name (its newest version
    tagged ``heygen_ray.variant=<value>``)."""
    from heygen_ray.tracking import find_variant_version

    if is_model_uri(value):
        return value, None
    if value in PRECISIONS:
        return base_uri, value
    name, _, _ = _split(base_uri)
    version = find_variant_version(name, value, tracking_uri=tracking_uri)
    if version is None:
        raise LookupError(f"no version of registered model {name!r} is tagged heygen_ray.variant={value!r}")
    return model_uri(name, version=version), None


def _int8(model: Any, config: Dict[str, Any], run_id: Optional[str], tracking_uri: Optional[str],
          compile_int8: bool) -> Tuple[Any, str]:

    from heygen_ray.compress.quantize import compile_frozen, load_int8_dynamic, load_pt2
    from heygen_ray.tracking import download_run_artifact

    file = str(config["extra"]["int8_artifact"])
    if run_id is None:
        raise ValueError(f"int8 variant {file} has no run to download it from")
    with tempfile.TemporaryDirectory(prefix="heygen_ray_int8_") as tmp:
        path = download_run_artifact(run_id, f"variant/{file}", tmp, tracking_uri=tracking_uri)
        if file.endswith(".pt2"):
            gm = load_pt2(path)
            return (compile_frozen(gm, freezing=True) if compile_int8 else gm), "int8_static"
        if file.endswith(".pt"):
            # `model` is a fresh fp32 build of the architecture: quantized, then the int8 state is
            # assigned with the restricted loader (weights_only=True)
            q = load_int8_dynamic(model, path)
            return (compile_frozen(q, freezing=False) if compile_int8 else q), "int8_dynamic"
    raise ValueError(f"unknown int8 artifact {file!r} (expected int8_dynamic .pt or int8_static .pt2)")


def load_variant(uri: str, *, tracking_uri: Optional[str] = None, precision: Optional[str] = None,
                 compile_int8: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """(runnable nn.Module taking the model's keyword inputs and returning float outputs, info).

    ``uri``: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the alias is resolved once,
    so the weights and the reported version always agree). ``precision="bf16"`` casts an fp32
    model (weights and inputs) to bfloat16. ``compile_int8=False`` runs int8 variants eagerly
    (slower, but no compile time at load)."""
    import torch

    from heygen_ray.compress.quantize import CastInputs, has_conv3d, to_bf16
    from heygen_ray.tracking import load_model_and_config, recorded, recorded_data_info, resolve_model_uri

    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name, alias, _ = _split(uri)
    ref = resolve_model_uri(uri, tracking_uri=tracking_uri)
    pinned = model_uri(ref.name, version=ref.version) if ref.name and ref.version else uri
    model, config = load_model_and_config(pinned, tracking_uri=tracking_uri)
    extra = config.get("extra") or {}
    variant = str(extra.get("variant") or "fp32")
    if extra.get("int8_artifact"):
        runnable, prec = _int8(model, config, ref.run_id, tracking_uri, compile_int8)
    elif precision == "bf16":
        runnable, prec = to_bf16(model), "bf16"
        variant = f"{variant}+bf16" if variant not in ("fp32", "bf16") else "bf16"
    elif config.get("dtype") == "bfloat16":
        fmt = torch.channels_last_3d if has_conv3d(model) else None
        runnable, prec = CastInputs(model, torch.bfloat16, fmt), "bf16"
    else:
        runnable, prec = model, "fp32"
    runnable.eval()
    info = {
        "uri": uri, "name": ref.name or name, "version": ref.version, "alias": alias, "run_id": ref.run_id,
        "variant": variant, "precision": prec, "model_name": config.get("registry_name"),
        "class": config.get("class"), "task": recorded(config, "task", tracking_uri=tracking_uri), "input_names": config.get("input_names"),
        "data_info": recorded_data_info(config, tracking_uri=tracking_uri), "int8_artifact": extra.get("int8_artifact"),
        "arch": model if prec.startswith("int8") else None,
    }
    if info["arch"] is None:
        info["arch"] = runnable.model if isinstance(runnable, CastInputs) else runnable
    return runnable, info


def public_info(info: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON-able lineage of a loaded variant (what /v1/models and the headers report)."""
    return {k: info.get(k) for k in ("name", "version", "alias", "run_id", "variant", "precision", "model_name", "uri")}


def lineage_headers(info: Dict[str, Any]) -> Dict[str, str]:
    """Response headers naming the model that answered."""
    return {"x-model-name": str(info.get("name")), "x-model-version": str(info.get("version")),
            "x-model-alias": str(info.get("alias") or ""), "x-model-run-id": str(info.get("run_id")),
            "x-model-variant": str(info.get("variant")), "x-model-precision": str(info.get("precision"))}


def current_version(uri: str, *, tracking_uri: Optional[str] = None) -> Optional[str]:
    """The version an alias URI points at now (a version URI: that version)."""
    from heygen_ray.tracking import resolve_model_uri

    return resolve_model_uri(uri, tracking_uri=tracking_uri).version


__all__ = ["load_variant", "resolve_variant_uri", "public_info", "lineage_headers", "current_version", "PRECISIONS"]
