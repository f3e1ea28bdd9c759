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

The chain is a sequence of steps, each a function of what it needs that returns :class:`Variant`
records (one per model the stage builds; see heygen_ray.compress.result); :func:`run_compression` runs them in order:

    load_teacher_step -> load_data -> (save teacher_fp32) -> prune_step -> distill_step
    -> reference_variants -> quantize_step -> unstructured_control_step -> export_step
    -> measure_step -> gate_step -> report_step -> register_step -> write_results

and returns a :class:`CompressResult` (what results.json holds, plus that file's path).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from heygen_ray import fsutil
from heygen_ray.compress.result import TEACHER, CompressResult, Variant, runnable_module
from heygen_ray.config import CompressSpec, ConfigError, GateSpec, MeasureSpec, PruneSpec, TrainSpec
from heygen_ray.train.result import TrainResult
from heygen_ray.uris import is_model_uri

log = logging.getLogger(__name__)


@dataclass
class HeldOutData:
    """The batches every step reads, loaded once."""

    task: Any
    info: Any
    eval_batches: List[Dict[str, Any]]  # raw batches of measure.split: quality
    train_batches: List[Dict[str, Any]]  # raw train batches: calibration, Taylor saliency, the fingerprint
    calibration: List[Dict[str, Any]]  # model inputs of the first quantize.calibration_batches of them
    example: Dict[str, Any]  # model inputs of 8 held-out rows: export, latency, agreement
    fingerprint: str  # of train_batches

    @property
    def eval_rows(self) -> int:
        return sum(len(b["label"]) for b in self.eval_batches)


@dataclass
class Workspace:
    """Where the variants are written (<run_dir>/<name>/variants/<variant>/) and what every saved
    model directory records (the architecture's registry name and constructor overrides)."""

    variants_dir: str
    model_name: str
    overrides: Dict[str, Any]

    def path(self, *parts: str) -> str:
        return os.path.join(self.variants_dir, *parts)

    def saved(self, name: str, model: Any, *, parent: Optional[str] = None, runnable: Any = None,
              source: Any = None) -> Variant:
        """``model`` saved as the model directory of variant ``name``, which runs from its safetensors
        (``runnable``/``source`` default to ``model``)."""
        from heygen_ray.tracking.models import save_model_dir

        d = save_model_dir(self.path(name), model, model_name=self.model_name, model_overrides=self.overrides)
        return Variant(name, model if runnable is None else runnable, _weights_file(d),
                       model if source is None else source, model_dir=d, parent=parent)


@dataclass
class StageRun:
    """The stage's folder and MLflow parent run (a NullTracker when tracking is off)."""

    out_dir: str
    track_cfg: Dict[str, Any]
    tracking_uri: Optional[str]
    parent: Any
    nested: CompressSpec  # the spec with tracking nested under the parent run (for the training jobs)


# -- the chain -------------------------------------------------------------------------------------
def run_compression(spec: CompressSpec) -> CompressResult:
    """Run the whole chain on the current Ray cluster; returns (and writes) the result."""
    spec = _resolved(spec)
    out_dir = _write_spec(spec)
    t_start = time.perf_counter()
    run = start_run(spec, out_dir)
    status = "FAILED"
    try:
        teacher_model, lineage, teacher_uri = load_teacher_step(spec, run)
        ws = Workspace(os.path.join(out_dir, "variants"), lineage["model_name"], lineage["overrides"])
        tspec = _train_spec(run.nested, f"{spec.name}-student", **{"model.name": ws.model_name})
        data = load_data(spec, tspec)
        teacher = ws.saved(TEACHER, teacher_model)
        pruned, prune_report = prune_step(teacher, spec.prune, tspec.seed, data, ws)
        distilled, distill_out = distill_step(pruned, teacher, spec, tspec, ws)
        variants = reference_variants(teacher, pruned, distilled, spec.measure.variants, ws)
        final = quantize_step(distilled, teacher, spec, tspec, data, ws)
        variants.append(final)
        if spec.prune.unstructured_control is not None:
            variants.append(unstructured_control_step(teacher, spec.prune.unstructured_control, ws))
        exported = export_step(variants, data.example, ws) if spec.quantize.export_pt2 else {}
        closeness = measure_step(variants, distilled, final, spec.measure, data)
        metric, alias_variant = gate_step(variants, spec.gate, data.task)
        table, svg = report_step(variants, metric, out_dir)
        versions = register_step(variants, spec, run, ws, lineage, data, table=table, svg=svg, alias_variant=alias_variant)
        result = CompressResult(
            name=spec.name, model=ws.model_name, teacher_uri=teacher_uri, lineage=lineage, recipe=spec.fingerprint(),
            calibration_fingerprint=data.fingerprint, metric=metric, prune=prune_report,
            distill={} if distill_out is None else {"metrics": distill_out.metrics, "checkpoint_uri": distill_out.checkpoint_uri,
                                                    "seconds": distill_out.seconds},
            final_variant=final.name, int8_vs_fp32_student=closeness, variants=[v.row for v in variants],
            exported_pt2=exported, alias=spec.gate.alias, alias_variant=alias_variant, eval_rows=data.eval_rows,
            mlflow_run_id=getattr(run.parent, "run_id", None), tracking_uri=run.tracking_uri, versions=versions,
            seconds=round(time.perf_counter() - t_start, 2))
        result.results_path = write_results(result, out_dir)
        status = "FINISHED"
        return result
    finally:
        run.parent.end(status)


def _resolved(spec: CompressSpec) -> CompressSpec:
    """The spec with an absolute run_dir (Ray workers do not share the driver's working directory),
    under the spec's ``storage`` root when it sets one."""
    from heygen_ray import runtime

    if spec.storage:
        runtime.use_storage(spec.storage)
    d = spec.to_dict()
    d["run_dir"] = fsutil.absolute(d["run_dir"])
    return CompressSpec.from_dict(d)


def _write_spec(spec: CompressSpec) -> str:
    """<run_dir>/<name>/ with the resolved spec.yaml; returns the folder."""
    out_dir = os.path.join(spec.run_dir, spec.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "spec.yaml"), "w") as f:
        f.write(spec.to_yaml())
    return out_dir


def start_run(spec: CompressSpec, out_dir: str) -> StageRun:
    """Start the stage's parent run (params: the spec; tags: stage and recipe)."""
    from heygen_ray import tracking

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
    return StageRun(out_dir, track_cfg, tracking_uri, parent, CompressSpec.from_dict(dict(spec.to_dict(), tracking=nested)))


def load_teacher_step(spec: CompressSpec, run: StageRun) -> Tuple[Any, Dict[str, Any], str]:
    """1. The teacher (trained here first, nested under the stage's run, when ``spec.teacher`` is
    unset): (model in eval mode, lineage, its URI)."""
    teacher_uri = spec.teacher
    if teacher_uri is None:
        tout = train_teacher(run.nested)
        teacher_uri = tout.model_uri or tout.checkpoint_uri
    teacher, lineage = load_teacher(teacher_uri, run.tracking_uri)
    teacher.eval()
    return teacher, lineage, teacher_uri


def load_data(spec: CompressSpec, tspec: TrainSpec) -> HeldOutData:
    """The held-out batches (``measure.split``) and the train batches that calibrate."""
    from heygen_ray.train.driver import prepare_data
    from heygen_ray.train.prepare import task_for

    task = task_for(tspec)
    # generates the embedded set when configured and absent; only `info` is needed here, so the
    # datasets stay lazy (video.cache would decode the whole training split for nothing)
    _, info = prepare_data(tspec, task, lazy=True)
    eval_batches = held_out_batches(tspec, task, spec.measure.split, spec.measure.max_eval_rows)
    train_batches = held_out_batches(tspec, task, "train", spec.quantize.calibration_batches * 8)
    calibration = [task.inputs(b)[0] for b in train_batches][: spec.quantize.calibration_batches]
    example = {k: v[:8] for k, v in task.inputs(eval_batches[0])[0].items()}
    return HeldOutData(task, info, eval_batches, train_batches, calibration, example, _fingerprint(train_batches))


def prune_step(teacher: Variant, prune_spec: PruneSpec, seed: int, data: HeldOutData,
               ws: Workspace) -> Tuple[Variant, Dict[str, Any]]:
    """2. Structured pruning of a copy of the teacher, no training: the "pruned" variant (always
    saved: distillation starts from its directory) and the pruning report."""
    from heygen_ray.compress import prune

    student = copy.deepcopy(teacher.source)
    report: Dict[str, Any] = {"method": "none"}
    if prune_spec.enabled:
        report = prune.structured_prune(
            student, {k: v[:2] for k, v in data.example.items()}, ratio=prune_spec.ratio,
            importance=prune_spec.importance, round_to=prune_spec.round_to, layer_ratios=prune_spec.layer_ratios,
            global_pruning=prune_spec.global_pruning, taylor_batches=[data.task.inputs(b) for b in data.train_batches[:2]],
            loss_fn=data.task.loss, seed=seed)
    student.eval()
    return ws.saved("pruned", student, parent=teacher.name), report


def distill_step(pruned: Variant, teacher: Variant, spec: CompressSpec, tspec: TrainSpec,
                 ws: Workspace) -> Tuple[Variant, Optional[TrainResult]]:
    """3. The pruned student trained from the frozen teacher on Ray Train (alpha = 0 would be plain
    fine-tuning), or the pruned model itself when distillation is off: the "pruned_distilled"
    variant (always saved) and the training job's results."""
    from heygen_ray.train.driver import run_training

    model, out = pruned.source, None
    if spec.distill.enabled:
        d = spec.distill
        out = run_training(tspec, extra_config={
            "init_model": pruned.model_dir,
            "distill": {"teacher": teacher.model_dir, "temperature": d.temperature, "alpha": d.alpha,
                        "hidden_weight": d.hidden_weight}})
        model = load_student(pruned.model_dir, out.checkpoint_uri)
    return ws.saved("pruned_distilled", model, parent=pruned.name), out


def reference_variants(teacher: Variant, pruned: Variant, distilled: Variant, wanted: Sequence[str],
                       ws: Workspace) -> List[Variant]:
    """4. The variants measured beside the final one, in the report's order: teacher_fp32, then
    those of ``measure.variants`` (bf16 casts saved as their own model directories)."""
    from heygen_ray.compress import quantize

    refs = set(wanted)
    out = [teacher]
    if "teacher_bf16" in refs:
        out.append(bf16_variant("teacher_bf16", teacher, ws))
    if "pruned" in refs:
        out.append(pruned)
    if "pruned_distilled" in refs:
        out.append(distilled)
    if "pruned_distilled_bf16" in refs:
        out.append(bf16_variant("pruned_distilled_bf16", distilled, ws))
    # fp32 through Inductor with freezing: what compilation alone gives (the int8 path's baseline)
    if "pruned_distilled_compiled" in refs:
        compiled = quantize.compile_frozen(copy.deepcopy(distilled.source), freezing=True)
        out.append(Variant("pruned_distilled_compiled", compiled, distilled.artifact, distilled.source,
                           model_dir=distilled.model_dir, parent=distilled.name))
    return out


def bf16_variant(name: str, of: Variant, ws: Workspace) -> Variant:
    """``of`` cast to bf16 (channels_last_3d for Conv3d models), saved as variant ``name``."""
    from heygen_ray.compress import quantize

    cast = quantize.to_bf16(of.source)
    return ws.saved(name, cast.model, runnable=cast, source=of.source, parent=of.name)


def quantize_step(distilled: Variant, teacher: Variant, spec: CompressSpec, tspec: TrainSpec, data: HeldOutData,
                  ws: Workspace) -> Variant:
    """5. The final variant: the distilled student in int8 (``quantize.scheme``), compiled, running
    from its int8 file (model.pt2, or int8_dynamic.pt) in variants/pruned_distilled_<scheme>/."""
    from heygen_ray.compress import quantize

    q = spec.quantize
    name = f"pruned_distilled_{q.scheme}"
    qdir = ws.path(name)
    os.makedirs(qdir, exist_ok=True)
    student = distilled.source
    if q.scheme in ("int8_static", "int8_qat"):
        if q.scheme == "int8_qat":
            qm = quantize.quantize_int8_qat(student, data.example, _qat_batches(spec, tspec, data.task, teacher.source),
                                            _qat_loss(spec), steps=q.qat_steps, lr=q.qat_lr, seed=tspec.seed)
        else:
            qm = quantize.quantize_int8_static(student, data.example, data.calibration)
        artifact = quantize.export_pt2(qm, data.example, os.path.join(qdir, "model.pt2"))
        runnable = quantize.compile_frozen(qm, freezing=True)
    else:
        qm = quantize.quantize_int8_dynamic(copy.deepcopy(student))
        artifact = quantize.save_int8_dynamic(qm, os.path.join(qdir, "int8_dynamic.pt"))
        runnable = quantize.compile_frozen(qm, freezing=False)
    return Variant(name, runnable, artifact, student, parent=distilled.name)


def unstructured_control_step(teacher: Variant, amount: float, ws: Workspace) -> Variant:
    """The control: a copy of the teacher with ``amount`` of its weights zeroed (L1, global), same
    shapes; saved as "unstructured_control"."""
    from heygen_ray.compress import prune

    ctrl = copy.deepcopy(teacher.source)
    prune.unstructured_prune(ctrl, amount=amount, method="l1")
    return ws.saved("unstructured_control", ctrl, parent=teacher.name)


def export_step(variants: Sequence[Variant], example: Mapping[str, Any], ws: Workspace) -> Dict[str, str]:
    """The fp32 and bf16 distilled students, when measured, also as torch.export ``model.pt2`` in
    their variant folders: {variant: path}."""
    from heygen_ray.compress import quantize

    by_name = {v.name: v for v in variants}
    return {name: quantize.export_pt2(by_name[name].runnable, example, ws.path(name, "model.pt2"))
            for name in ("pruned_distilled", "pruned_distilled_bf16") if name in by_name}


def measure_step(variants: Sequence[Variant], reference: Variant, final: Variant, measure_spec: MeasureSpec,
                 data: HeldOutData) -> Dict[str, float]:
    """6. Every variant measured in this process (``measure.threads`` torch threads) on the same
    held-out batches: quality, parameters, size on disk, FLOPs, then latencies interleaved across
    variants; each variant's ``row`` is filled. Returns how close the final variant's outputs are
    to ``reference``'s (the fp32 student it was quantized from)."""
    import torch

    from heygen_ray.compress import measure

    threads = torch.get_num_threads()
    if measure_spec.threads:
        torch.set_num_threads(measure_spec.threads)
    try:
        for v in variants:
            fn = v.runnable
            fn.eval() if hasattr(fn, "eval") else None
            metrics = measure.evaluate(fn, data.eval_batches, data.task, data.info, batch_size=8)
            v.row = {"variant": v.name, "metrics": metrics, "params": measure.count_params(runnable_module(fn)),
                     "size_bytes": measure.file_size(v.artifact), "artifact": v.artifact,
                     "flops_per_sample": measure.flops_per_sample(v.source, data.example)}
        batch1 = {k: t[:1] for k, t in data.example.items()}
        lat = measure.latencies({v.name: v.runnable for v in variants}, {1: batch1, 8: data.example},
                                rounds=measure_spec.rounds, iters=measure_spec.iters)
        closeness = measure.agreement(reference.runnable, final.runnable, [data.example])
        if measure_spec.breakdown:
            for v in variants:
                if v.name in (TEACHER, final.name):
                    v.row["batch1_breakdown"] = measure.time_breakdown(v.runnable, batch1)
    finally:
        torch.set_num_threads(threads)
    for v in variants:
        v.row.update(lat[v.name])
    return closeness


def gate_step(variants: Sequence[Variant], gate: GateSpec, task: Any) -> Tuple[str, Optional[str]]:
    """7. Quality against teacher_fp32 and the gate (``gate.max_drop``), speedups against the fp32
    (and, when measured, bf16) teacher, in every row. Returns the metric and the variant the alias
    goes to: the fastest student that passes (None when none does)."""
    from heygen_ray.compress import report

    rows = [v.row for v in variants]
    names = [v.name for v in variants]
    metric = gate.metric or task.primary_metric
    report.apply_gate(rows, teacher=TEACHER, metric=metric, max_drop=gate.max_drop, mode=task.primary_mode)
    report.add_speedups(rows, TEACHER, "teacher_bf16" if "teacher_bf16" in names else None)
    candidates = [n for n in names if not n.startswith("teacher") and n != "unstructured_control"]
    return metric, report.pick_alias(rows, candidates)


def report_step(variants: Sequence[Variant], metric: str, out_dir: str) -> Tuple[str, str]:
    """8. report.md (the table) and accuracy_vs_latency.svg in the stage's folder; returns both texts."""
    from heygen_ray.compress import report

    rows = [v.row for v in variants]
    table, svg = report.markdown_table(rows, metric), report.svg_scatter(rows, metric)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "accuracy_vs_latency.svg"), "w") as f:
        f.write(svg)
    return table, svg


def register_step(variants: Sequence[Variant], spec: CompressSpec, run: StageRun, ws: Workspace,
                  lineage: Dict[str, Any], data: HeldOutData, *, table: str, svg: str,
                  alias_variant: Optional[str]) -> Dict[str, Optional[str]]:
    """9. MLflow: the report on the parent run, a child run and a registry version per variant
    (``variant.version``), and the gate's alias on ``alias_variant``'s version. Returns {variant: version}."""
    from heygen_ray import tracking

    run.parent.log_text(table, "report.md")
    run.parent.log_text(svg, "accuracy_vs_latency.svg")
    run.parent.log_dict(_jsonable([v.row for v in variants]), "report.json")
    versions: Dict[str, Optional[str]] = {}
    for v in variants:
        v.version = versions[v.name] = _log_variant(spec, run, v, ws, lineage, data)
    if alias_variant and spec.registered_model_name and versions.get(alias_variant) and run.tracking_uri:
        tracking.set_alias(spec.registered_model_name, spec.gate.alias, versions[alias_variant], tracking_uri=run.tracking_uri)
    return versions


def write_results(result: CompressResult, out_dir: str) -> str:
    """<out_dir>/results.json: the result without its own path; returns that path."""
    path = os.path.join(out_dir, "results.json")
    d = result.to_dict()
    d.pop("results_path")
    with open(path, "w") as f:
        json.dump(_jsonable(d), f, indent=2)
    return path


# -- teacher, student and data helpers (also used by the compression sweep and the tests) ----------
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


def train_teacher(spec: CompressSpec) -> TrainResult:
    """Train the teacher with ``spec.train`` for ``teacher_steps`` steps (when ``spec.teacher`` is unset);
    returns the training job's results (``checkpoint_uri``, and ``model_uri`` when tracked). A
    compression sweep calls it once so that every trial compresses the same teacher."""
    from heygen_ray.train.driver import run_training

    return run_training(_train_spec(spec, f"{spec.name}-teacher", steps=spec.teacher_steps))


def load_teacher(uri: str, tracking_uri: Optional[str]) -> Tuple[Any, Dict[str, Any]]:
    """(model, lineage) from ``models:/...`` (or a logged-model directory) or a checkpoint directory."""
    from heygen_ray.tracking import load_model_and_config, resolve_model_uri

    if is_model_uri(uri):
        model, config = load_model_and_config(uri, tracking_uri=tracking_uri)
        ref = resolve_model_uri(uri, tracking_uri=tracking_uri)
        return model, {"parent_model": ref.name or uri, "parent_version": ref.version, "parent_uri": uri,
                       "model_name": config["registry_name"], "overrides": config.get("overrides", {})}
    if os.path.isfile(os.path.join(uri, "artifacts", "model.json")):
        model, config = load_model_and_config(uri)
        return model, {"parent_uri": uri, "model_name": config["registry_name"], "overrides": config.get("overrides", {})}
    from heygen_ray.models import create_model
    from heygen_ray.train.checkpoint import read_meta
    from heygen_ray.train.prepare import model_overrides, task_for
    from heygen_ray.train.tasks import DataInfo

    meta = read_meta(uri)  # a checkpoint directory of the one format
    tspec = TrainSpec.from_dict(meta.spec, source=f"{uri}/meta.json")
    info = DataInfo(**meta.extra.get("data_info", {}))
    overrides = model_overrides(tspec, task_for(tspec), info)
    model = create_model(tspec.model.name, **overrides)
    _load_final_weights(model, uri)
    return model.eval(), {"parent_uri": uri, "model_name": tspec.model.name, "overrides": overrides}


def load_student(init_dir: str, checkpoint_dir: str):
    """The distilled student: the pruned architecture with the checkpoint's final weights."""
    from heygen_ray.tracking import load_model

    model = load_model(init_dir)
    _load_final_weights(model, checkpoint_dir)
    return model.eval()


def _load_final_weights(model: Any, checkpoint_dir: str) -> None:
    """The checkpoint's final weights (EMA when it has them, as training logs them) into ``model``."""
    from heygen_ray.train.checkpoint import CheckpointError, load_final_weights

    state = load_final_weights(checkpoint_dir)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint_dir}: does not fit {type(model).__name__}: {err}") from None


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


# -- small helpers ---------------------------------------------------------------------------------
def _weights_file(artifact: str) -> str:
    """The file a variant runs from: a model directory's safetensors, or the artifact file itself."""
    return os.path.join(artifact, "artifacts", "model.safetensors") if os.path.isdir(artifact) else artifact


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


def _log_variant(spec: CompressSpec, run: StageRun, variant: Variant, ws: Workspace, lineage: Dict[str, Any],
                 data: HeldOutData) -> Optional[str]:
    """A child run with the variant's figures; the model logged (and registered) with lineage tags."""
    from heygen_ray import tracking

    row = variant.row
    child = tracking.make_tracker(run.track_cfg, run.out_dir, run_name=variant.name, nested_under=run.parent)
    if not isinstance(child, tracking.Tracker):
        return None
    with child:
        figures = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        figures.update({f"quality_{k}": v for k, v in row["metrics"].items()})
        child.log_metrics(figures)
        tags = {"variant": variant.name, "passes_gate": str(row["passes_gate"]).lower(), "recipe": spec.fingerprint(),
                "calibration_fingerprint": data.fingerprint,
                "parent_model": str(lineage.get("parent_model") or lineage.get("parent_uri")),
                "parent_version": str(lineage.get("parent_version"))}
        child.set_tags({f"heygen_ray.{k}": v for k, v in tags.items()})
        if variant.is_int8:  # the int8 file itself
            child.log_artifact(row["artifact"], "variant")
        # the registry holds the loadable model: the fp32/bf16 weights the variant runs from (int8
        # variants: their fp32 source, and the int8 file as the run's "variant" artifact; model.json
        # names the scheme)
        to_log = variant.registered_module()
        logged = tracking.log_model(
            child, to_log, model_name=ws.model_name, model_overrides=ws.overrides,
            registered_model_name=spec.registered_model_name,
            input_example={k: v[:1].to(next(to_log.parameters()).dtype) if v.is_floating_point() else v[:1]
                           for k, v in data.example.items()},
            extra={"variant": variant.name, "quality": row["quality"], "lineage": lineage,
                   "int8_artifact": os.path.basename(row["artifact"]) if variant.is_int8 else None},
            version_tags={f"heygen_ray.{k}": v for k, v in tags.items()},
        )
    return logged.version if logged is not None else None
