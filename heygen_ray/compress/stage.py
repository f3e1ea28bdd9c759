"""The compression stage: teacher -> prune -> distill (Ray Train) -> quantize -> measure -> report
-> MLflow (a parent run, a child run per variant, a registry version per variant, the gate's alias).

Variants (all measured on the same held-out split, in this process, latencies interleaved):
  teacher_fp32, teacher_bf16, pruned (no training), pruned_distilled, pruned_distilled_bf16,
  pruned_distilled_compiled (fp32, torch.compile with freezing), pruned_distilled_<int8 scheme> (the
  final variant), and unstructured_control when asked. ``measure.variants`` picks which of the
  reference variants (all but teacher_fp32 and the final one) are measured and registered.

Artifacts under <run_dir>/<name>/variants/<variant>/: the model directory (safetensors + model.json,
loadable with `heygen_ray.tracking.load_model`), plus `int8_dynamic.pt` (torch.load weights_only) or
`model.pt2` (torch.export) for the int8 variants. Size on disk is the file the variant runs from.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from heygen_ray import fsutil
from heygen_ray.config import CompressSpec, ConfigError, TrainSpec

log = logging.getLogger(__name__)


INT8_SCHEMES = ("int8_static", "int8_dynamic", "int8_qat")


def _train_spec(spec: CompressSpec, name: str, **changes: Any) -> TrainSpec:
    d = spec.train.to_dict()
    d["name"] = name
    d["run_dir"] = spec.run_dir
    d["tracking"] = dict(spec.tracking.to_dict(), registered_model_name=None)
    for k, v in changes.items():
        node = d
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return TrainSpec.from_dict(d, source=f"compress.train ({name})")


def train_teacher(spec: CompressSpec) -> Dict[str, Any]:
    """Train the teacher with ``spec.train`` for ``teacher_steps`` steps (when ``spec.teacher`` is unset);
    returns the training job's results (``checkpoint_uri``, and ``model_uri`` when tracked). A
    compression sweep calls it once so that every trial compresses the same teacher."""
    from heygen_ray.train.driver import run_training

    return run_training(_train_spec(spec, f"{spec.name}-teacher", steps=spec.teacher_steps))


def load_teacher(uri: str, spec: CompressSpec, tracking_uri: Optional[str]) -> Tuple[Any, Dict[str, Any]]:
    """(model, lineage) from ``models:/...`` (or a logged-model directory) or a checkpoint directory."""
    from heygen_ray.tracking import load_model_and_config, resolve_model_uri

    if uri.startswith("models:/"):
        model, config = load_model_and_config(uri, tracking_uri=tracking_uri)
        ref = resolve_model_uri(uri, tracking_uri=tracking_uri)
        return model, {"parent_model": ref.name or uri, "parent_version": ref.version, "parent_uri": uri,
                       "model_name": config["registry_name"], "overrides": config.get("overrides", {})}
    if os.path.isfile(os.path.join(uri, "artifacts", "model.json")):
        model, config = load_model_and_config(uri)
        return model, {"parent_uri": uri, "model_name": config["registry_name"], "overrides": config.get("overrides", {})}
    from heygen_ray.models import create_model
    from heygen_ray.train.checkpoint import read_meta
    from heygen_ray.train.loop import model_overrides, task_for
    from heygen_ray.train.tasks import DataInfo

    meta = read_meta(uri)  # a checkpoint directory of the one format
    tspec = TrainSpec.from_dict(meta.spec, source=f"{uri}/meta.json")
    info = DataInfo(**meta.extra.get("data_info", {}))
    overrides = model_overrides(tspec, task_for(tspec), info)
    model = create_model(tspec.model.name, **overrides)
    load_final_weights(model, uri)
    return model.eval(), {"parent_uri": uri, "model_name": tspec.model.name, "overrides": overrides}


def held_out_batches(tspec: TrainSpec, task: Any, split: str, max_rows: int, batch_size: int = 8) -> List[Dict[str, Any]]:
    """Raw batches (uint8 clips + labels) of one split, held in memory."""
    from heygen_ray.data.video import VideoPipeline

    pipe = VideoPipeline.from_spec(tspec.data.video)
    if pipe.rows(split).num_rows == 0:
        raise ConfigError(f"measure.split: the manifest has no {split!r} rows")
    ds = pipe.dataset(split, columns=list(task.columns), cache=False)
    out, n = [], 0
    for b in ds.iter_torch_batches(batch_size=batch_size, dtypes=dict(task.dtypes)):
        out.append(dict(b))
        n += len(b["label"])
        if n >= max_rows:
            break
    return out


def run_compression(spec: CompressSpec) -> Dict[str, Any]:
    """Run the whole chain on the current Ray cluster; returns (and writes) the report."""
    import torch

    from heygen_ray import tracking
    from heygen_ray.compress import measure, prune, quantize, report
    from heygen_ray.train.driver import prepare_data, run_training
    from heygen_ray.train.loop import task_for
    from heygen_ray.tracking.models import save_model_dir

    d = spec.to_dict()
    d["run_dir"] = fsutil.absolute(d["run_dir"])
    spec = CompressSpec.from_dict(d)
    out_dir = os.path.join(spec.run_dir, spec.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "spec.yaml"), "w") as f:
        f.write(spec.to_yaml())
    t_start = time.perf_counter()
    track_cfg = spec.tracking.to_dict()
    tracking_uri = tracking.resolve_tracking_uri(track_cfg, out_dir) if spec.tracking.enabled else None
    if tracking_uri:
        track_cfg["tracking_uri"] = tracking_uri
    parent = tracking.make_tracker(track_cfg, out_dir, run_name=f"compress-{spec.name}",
                                   nested_under=spec.tracking.parent_run_id)
    parent.start()
    parent.log_params(spec.to_dict())
    parent.set_tags({"heygen_ray.stage": "compress", "heygen_ray.recipe": spec.fingerprint()})
    nested = dict(spec.tracking.to_dict(), tracking_uri=tracking_uri, parent_run_id=getattr(parent, "run_id", None))
    spec_n = CompressSpec.from_dict(dict(spec.to_dict(), tracking=nested))
    status = "FAILED"
    try:
        # 1. the teacher (trained here first when none is given)
        teacher_uri = spec.teacher
        if teacher_uri is None:
            tout = train_teacher(spec_n)
            teacher_uri = tout.get("model_uri") or tout["checkpoint_uri"]
        teacher, lineage = load_teacher(teacher_uri, spec, tracking_uri)
        teacher.eval()
        model_name, overrides = lineage["model_name"], lineage["overrides"]
        tspec = _train_spec(spec_n, f"{spec.name}-student", **{"model.name": model_name})
        task = task_for(tspec)
        # generates the embedded set when configured and absent; only `info` is needed here, so the
        # datasets stay lazy (video.cache would decode the whole training split for nothing)
        _, info = prepare_data(tspec, task, lazy=True)
        eval_batches = held_out_batches(tspec, task, spec.measure.split, spec.measure.max_eval_rows)
        calib_src = held_out_batches(tspec, task, "train", spec.quantize.calibration_batches * 8)
        calib = [task.inputs(b)[0] for b in calib_src][: spec.quantize.calibration_batches]
        example = {k: v[:8] for k, v in task.inputs(eval_batches[0])[0].items()}
        fingerprint = _fingerprint(calib_src)

        vdir = os.path.join(out_dir, "variants")
        teacher_dir = save_model_dir(os.path.join(vdir, "teacher_fp32"), teacher, model_name=model_name,
                                     model_overrides=overrides)
        # 2. prune
        student = copy.deepcopy(teacher)
        prune_report = {"method": "none"}
        if spec.prune.enabled:
            prune_report = prune.structured_prune(
                student, {k: v[:2] for k, v in example.items()}, ratio=spec.prune.ratio,
                importance=spec.prune.importance, round_to=spec.prune.round_to,
                layer_ratios=spec.prune.layer_ratios, global_pruning=spec.prune.global_pruning,
                taylor_batches=[task.inputs(b) for b in calib_src[:2]], loss_fn=task.loss, seed=tspec.seed)
        student.eval()
        pruned_dir = save_model_dir(os.path.join(vdir, "pruned"), student, model_name=model_name, model_overrides=overrides)
        # 3. distill on Ray Train (alpha = 0 would be plain fine-tuning)
        distilled = student
        distill_out: Dict[str, Any] = {}
        if spec.distill.enabled:
            distill_out = run_training(tspec, extra_config={
                "init_model": pruned_dir,
                "distill": {"teacher": teacher_dir, "temperature": spec.distill.temperature, "alpha": spec.distill.alpha,
                            "hidden_weight": spec.distill.hidden_weight}})
            distilled = load_student(pruned_dir, distill_out["checkpoint_uri"])
        distilled_dir = save_model_dir(os.path.join(vdir, "pruned_distilled"), distilled, model_name=model_name,
                                       model_overrides=overrides)
        # 4. the variants, as runnables + the artifact each runs from
        variants: Dict[str, Any] = {}
        arts: Dict[str, str] = {}
        archs: Dict[str, Any] = {}

        def add(name: str, runnable: Any, artifact: str, arch_model: Any) -> None:
            """``artifact``: the file the variant runs from (a model directory: its safetensors)."""
            weights = os.path.join(artifact, "artifacts", "model.safetensors")
            variants[name], archs[name] = runnable, arch_model
            arts[name] = weights if os.path.isdir(artifact) else artifact

        def add_bf16(name: str, source: Any) -> None:
            cast = quantize.to_bf16(source)
            add(name, cast, save_model_dir(os.path.join(vdir, name), cast.model, model_name=model_name,
                                           model_overrides=overrides), source)

        refs = set(spec.measure.variants)
        add("teacher_fp32", teacher, teacher_dir, teacher)
        if "teacher_bf16" in refs:
            add_bf16("teacher_bf16", teacher)
        if "pruned" in refs:
            add("pruned", student, pruned_dir, student)
        if "pruned_distilled" in refs:
            add("pruned_distilled", distilled, distilled_dir, distilled)
        if "pruned_distilled_bf16" in refs:
            add_bf16("pruned_distilled_bf16", distilled)
        # fp32 through Inductor with freezing: what compilation alone gives (the int8 path's baseline)
        if "pruned_distilled_compiled" in refs:
            add("pruned_distilled_compiled", quantize.compile_frozen(copy.deepcopy(distilled), freezing=True),
                distilled_dir, distilled)
        final = f"pruned_distilled_{spec.quantize.scheme}"
        qdir = os.path.join(vdir, final)
        os.makedirs(qdir, exist_ok=True)
        if spec.quantize.scheme in ("int8_static", "int8_qat"):
            if spec.quantize.scheme == "int8_qat":
                qm = quantize.quantize_int8_qat(distilled, example, _qat_batches(spec, tspec, task, teacher),
                                                _qat_loss(spec), steps=spec.quantize.qat_steps,
                                                lr=spec.quantize.qat_lr, seed=tspec.seed)
            else:
                qm = quantize.quantize_int8_static(distilled, example, calib)
            q_art = quantize.export_pt2(qm, example, os.path.join(qdir, "model.pt2"))
            add(final, quantize.compile_frozen(qm, freezing=True), q_art, distilled)
        else:
            qm = quantize.quantize_int8_dynamic(copy.deepcopy(distilled))
            q_art = quantize.save_int8_dynamic(qm, os.path.join(qdir, "int8_dynamic.pt"))
            add(final, quantize.compile_frozen(qm, freezing=False), q_art, distilled)
        if spec.prune.unstructured_control is not None:
            ctrl = copy.deepcopy(teacher)
            prune.unstructured_prune(ctrl, amount=spec.prune.unstructured_control, method="l1")
            add("unstructured_control", ctrl, save_model_dir(os.path.join(vdir, "unstructured_control"), ctrl,
                                                             model_name=model_name, model_overrides=overrides), ctrl)
        exported: Dict[str, str] = {}
        if spec.quantize.export_pt2:
            for name in ("pruned_distilled", "pruned_distilled_bf16"):
                if name not in variants:
                    continue
                exported[name] = quantize.export_pt2(variants[name], example, os.path.join(vdir, name, "model.pt2"))
        # 5. measure
        threads = torch.get_num_threads()
        if spec.measure.threads:
            torch.set_num_threads(spec.measure.threads)
        try:
            rows = []
            for name, fn in variants.items():
                fn.eval() if hasattr(fn, "eval") else None
                metrics = measure.evaluate(fn, eval_batches, task, info, batch_size=8)
                rows.append({"variant": name, "metrics": metrics, "params": measure.count_params(_module(fn)),
                             "size_bytes": measure.file_size(arts[name]), "artifact": arts[name],
                             "flops_per_sample": measure.flops_per_sample(archs[name], example)})
            lat = measure.latencies(variants, {1: {k: v[:1] for k, v in example.items()}, 8: example},
                                    rounds=spec.measure.rounds, iters=spec.measure.iters)
            close = measure.agreement(distilled, variants[final], [example])
        finally:
            torch.set_num_threads(threads)
        for r in rows:
            r.update(lat[r["variant"]])
        metric = spec.gate.metric or task.primary_metric
        report.apply_gate(rows, teacher="teacher_fp32", metric=metric, max_drop=spec.gate.max_drop, mode=task.primary_mode)
        report.add_speedups(rows, "teacher_fp32", "teacher_bf16" if "teacher_bf16" in variants else None)
        candidates = [r["variant"] for r in rows if not r["variant"].startswith("teacher") and r["variant"] != "unstructured_control"]
        alias_variant = report.pick_alias(rows, candidates)
        # 6. report files
        table = report.markdown_table(rows, metric)
        svg = report.svg_scatter(rows, metric)
        result: Dict[str, Any] = {
            "name": spec.name, "model": model_name, "teacher_uri": teacher_uri, "lineage": lineage,
            "recipe": spec.fingerprint(), "calibration_fingerprint": fingerprint, "metric": metric,
            "prune": prune_report, "distill": {k: v for k, v in distill_out.items() if k in ("metrics", "checkpoint_uri", "seconds")},
            "final_variant": final, "int8_vs_fp32_student": close, "variants": rows, "exported_pt2": exported,
            "alias": spec.gate.alias, "alias_variant": alias_variant, "eval_rows": sum(len(b["label"]) for b in eval_batches),
            "mlflow_run_id": getattr(parent, "run_id", None), "tracking_uri": tracking_uri,
        }
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write(table)
        with open(os.path.join(out_dir, "accuracy_vs_latency.svg"), "w") as f:
            f.write(svg)
        # 7. MLflow: child run per variant, registry version per variant, alias by the gate
        parent.log_text(table, "report.md")
        parent.log_text(svg, "accuracy_vs_latency.svg")
        parent.log_dict(_jsonable(rows), "report.json")
        versions = {}
        for r in rows:
            versions[r["variant"]] = _log_variant(spec, parent, track_cfg, out_dir, r, variants[r["variant"]],
                                                  archs[r["variant"]], model_name, overrides, lineage, fingerprint, example)
        result["versions"] = versions
        if alias_variant and spec.registered_model_name and versions.get(alias_variant) and tracking_uri:
            tracking.set_alias(spec.registered_model_name, spec.gate.alias, versions[alias_variant], tracking_uri=tracking_uri)
        result["seconds"] = round(time.perf_counter() - t_start, 2)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(_jsonable(result), f, indent=2)
        result["results_path"] = os.path.join(out_dir, "results.json")
        status = "FINISHED"
        return result
    finally:
        parent.end(status)


def _qat_batches(spec: CompressSpec, tspec: TrainSpec, task: Any, teacher: Any) -> List[Tuple[Dict[str, Any], Any]]:
    """(inputs, (labels, teacher logits)) batches of 8 from the train split for the QAT fine-tune."""
    import torch

    out = []
    for b in held_out_batches(tspec, task, "train", spec.quantize.qat_steps * 8):
        inputs, labels = task.inputs(b)
        with torch.no_grad():
            out.append((inputs, (labels, teacher(**inputs).float())))
    return out


def _qat_loss(spec: CompressSpec):
    """The QAT fine-tune keeps distilling: the stage's DistillationLoss (temperature, alpha)."""
    from heygen_ray.losses import DistillationLoss

    crit = DistillationLoss(temperature=spec.distill.temperature, alpha=spec.distill.alpha)
    return lambda outputs, targets: crit(outputs.float(), targets[1], targets[0])[0]


def load_student(init_dir: str, checkpoint_dir: str):
    """The distilled student: the pruned architecture with the checkpoint's EMA (or raw) weights."""
    from heygen_ray.tracking import load_model

    model = load_model(init_dir)
    load_final_weights(model, checkpoint_dir)
    return model.eval()


def load_final_weights(model: Any, checkpoint_dir: str) -> None:
    """The EMA weights of a checkpoint when it has them (what training logs as the final model),
    else the raw ones. ema.safetensors holds an AveragedModel: keys under "module.", plus a counter."""
    from safetensors.torch import load_file

    from heygen_ray.train.checkpoint import CheckpointError

    ema = os.path.join(checkpoint_dir, "ema.safetensors")
    if os.path.isfile(ema):
        state = {k[len("module."):]: v for k, v in load_file(ema).items() if k.startswith("module.")}
    else:
        state = load_file(os.path.join(checkpoint_dir, "model.safetensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint_dir}: does not fit {type(model).__name__}: {err}") from None


def _module(fn: Any):
    from heygen_ray.compress.quantize import CastInputs, FrozenCompiled

    while isinstance(fn, (CastInputs, FrozenCompiled)):
        fn = fn.model if isinstance(fn, CastInputs) else fn.inner
    return fn


def _fingerprint(batches: List[Dict[str, Any]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _log_variant(spec: CompressSpec, parent: Any, track_cfg: Dict[str, Any], out_dir: str, row: Dict[str, Any],
                 runnable: Any, arch_model: Any, model_name: str, overrides: Dict[str, Any], lineage: Dict[str, Any],
                 fingerprint: str, example: Dict[str, Any]) -> Optional[str]:
    """A child run with the variant's figures; the model logged (and registered) with lineage tags."""
    from heygen_ray import tracking
    from heygen_ray.compress.quantize import CastInputs

    child = tracking.make_tracker(track_cfg, out_dir, run_name=row["variant"], nested_under=parent)
    if not isinstance(child, tracking.Tracker):
        return None
    with child:
        figures = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        figures.update({f"quality_{k}": v for k, v in row["metrics"].items()})
        child.log_metrics(figures)
        tags = {"variant": row["variant"], "passes_gate": str(row["passes_gate"]).lower(), "recipe": spec.fingerprint(),
                "calibration_fingerprint": fingerprint, "parent_model": str(lineage.get("parent_model") or lineage.get("parent_uri")),
                "parent_version": str(lineage.get("parent_version"))}
        child.set_tags({f"heygen_ray.{k}": v for k, v in tags.items()})
        if row["variant"].endswith(INT8_SCHEMES):  # the int8 file itself
            child.log_artifact(row["artifact"], "variant")
        # the registry holds the loadable model: the fp32/bf16 weights the variant runs from (int8
        # variants: their fp32 source, and the int8 file as the run's "variant" artifact; model.json
        # names the scheme)
        int8 = row["variant"].endswith(INT8_SCHEMES)
        to_log = arch_model if int8 else runnable.model if isinstance(runnable, CastInputs) else _module(runnable)
        logged = tracking.log_model(
            child, to_log, model_name=model_name, model_overrides=overrides,
            registered_model_name=spec.registered_model_name,
            input_example={k: v[:1].to(next(to_log.parameters()).dtype) if v.is_floating_point() else v[:1] for k, v in example.items()},
            extra={"variant": row["variant"], "quality": row["quality"], "lineage": lineage,
                   "int8_artifact": os.path.basename(row["artifact"]) if int8 else None},
            version_tags={f"heygen_ray.{k}": v for k, v in tags.items()},
        )
    return logged.version if logged is not None else None
