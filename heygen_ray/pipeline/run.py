"""Running a planned pipeline on the Ray this process joined: one MLflow parent run, a child run per
stage, each unit skipped, resumed or run by the ledger (:mod:`heygen_ray.pipeline.plan`)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from heygen_ray import fsutil, ray_private
from heygen_ray.config import (
    CompressSpec,
    PipelineSpec,
    SweepSpec,
    TrainSpec,
)
from heygen_ray.pipeline.plan import (
    Ledger,
    Unit,
    code_version,
    data_fingerprint,
    downstream,
    endpoint_section,
    plan_pipeline,
    unit_key,
)
from heygen_ray.uris import model_uri

Progress = Callable[[str, int, Optional[int]], None]


# --------------------------------------------------------------------------------------------------
# Progress of training steps (reported by the Train controller, read by the driver)
# --------------------------------------------------------------------------------------------------

def _progress_key(unit: str) -> str:
    return f"pipeline_progress:{unit}"


def _train_progress_callback(unit: str, total: int):
    from ray.train import UserCallback

    class ReportProgress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            from heygen_ray.ray_private import kv_put

            steps = [m.get("step") for m in (metrics or []) if isinstance(m, dict) and m.get("step") is not None]
            if steps:
                kv_put(_progress_key(unit), json.dumps([int(max(steps)), total]).encode())

    return ReportProgress()


class _Poller:
    """Forwards a unit's step counts from Ray's KV store to ``on_progress`` while the unit runs."""

    def __init__(self, unit: str, on_progress: Optional[Progress], total: Optional[int]) -> None:
        self.unit, self.on_progress, self.total = unit, on_progress, total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Poller":
        if self.on_progress:
            self.on_progress(self.unit, 0, self.total)
            self._thread.start()
        return self

    def _run(self) -> None:
        from heygen_ray.ray_private import kv_get

        while not self._stop.wait(1.0):
            try:
                raw = kv_get(_progress_key(self.unit))
            except Exception:  # noqa: BLE001 (Ray shutting down)
                return
            if raw:
                done, total = json.loads(raw)
                self.on_progress(self.unit, done, total)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


# --------------------------------------------------------------------------------------------------
# Running the stages
# --------------------------------------------------------------------------------------------------


def _set_champion(name: Optional[str], version: Optional[str], alias: str, uri: Optional[str]) -> bool:
    if not (name and version and uri):
        return False
    from heygen_ray.tracking import set_alias

    set_alias(name, alias, version, tracking_uri=uri)
    return True


def _gate_passes(gate: Any, metrics: Mapping[str, Any]) -> Optional[bool]:
    if gate is None:
        return True
    value = metrics.get(gate.metric)
    if not isinstance(value, (int, float)):
        return False
    return value >= gate.min_value if gate.min_value is not None else value <= gate.max_value


class PipelineRun:
    def __init__(self, spec: PipelineSpec, *, force: Sequence[str] = (), on_progress: Optional[Progress] = None,
                 on_event: Optional[Callable[[str, str, Dict[str, Any]], None]] = None) -> None:
        self.spec = spec
        self.units = plan_pipeline(spec)  # fails here on any bad stage config, before Ray starts
        self.forced = set(downstream(self.units, force)) if force else set()
        self.out_dir = fsutil.absolute(spec.output_dir)
        self.ledger = Ledger(os.path.join(self.out_dir, "ledger.json"))
        self.on_progress, self.on_event = on_progress, on_event or (lambda *a: None)
        self.code = code_version()
        self.keys: Dict[str, str] = {}
        self.outputs: Dict[str, Dict[str, Any]] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        from heygen_ray import runtime, tracking

        spec = self.spec
        os.makedirs(self.out_dir, exist_ok=True)
        runtime.require_ray("run_pipeline")
        trk = tracking.resolve_spec(spec.tracking, self.out_dir)
        self.tracking_uri = trk.tracking_uri if trk.enabled else None
        parent = tracking.make_tracker(trk, self.out_dir, run_name=f"pipeline-{spec.name}",
                                       tags={"heygen_ray.pipeline": spec.name})
        parent.start()
        parent.log_params({"stages": ",".join(u.name for u in self.units), "code_version": self.code,
                           "forced": ",".join(sorted(self.forced))})
        parent.log_dict(spec.to_dict(), "pipeline.json")
        t0 = time.perf_counter()
        rows: List[Dict[str, Any]] = []
        status = "FAILED"
        stage_runs: Dict[str, Any] = {}
        try:
            for unit in self.units:
                if unit.stage not in stage_runs:
                    stage_runs[unit.stage] = tracking.make_tracker(trk, self.out_dir, run_name=f"stage:{unit.stage}",
                                                                   nested_under=parent, tags={"heygen_ray.stage": unit.stage})
                    stage_runs[unit.stage].start()
                rows.append(self._run_unit(unit, stage_runs[unit.stage]))
            status = "FINISHED"
        finally:
            for s in stage_runs.values():
                s.end(status if status == "FINISHED" else "FAILED")
            parent.log_metrics({"seconds": time.perf_counter() - t0})
            parent.end(status)
        result = {
            "name": spec.name, "spec_fingerprint": spec.fingerprint(), "code_version": self.code,
            "seconds": round(time.perf_counter() - t0, 2), "summary": rows, "stages": self.outputs,
            "ledger": self.ledger.path, "tracking_uri": self.tracking_uri, "mlflow_run_id": getattr(parent, "run_id", None),
            "dashboard_url": ray_private.dashboard_url(), "ray_logs": ray_private.logs_dir(),
        }
        return result

    def _run_unit(self, unit: Unit, stage_run: Any) -> Dict[str, Any]:
        data_fp = data_fingerprint(self._manifest_path()) if unit.stage != "data" else None
        key = unit_key(unit, {d: self.keys.get(d, "") for d in unit.deps}, data_fp, self.code)
        self.keys[unit.name] = key
        prev = self.ledger.get(unit.name)
        fresh = prev is None or prev.get("key") != key or unit.name in self.forced
        if prev is not None and not fresh and prev.get("status") == "finished" and unit.stage != "serve":
            self.outputs[unit.name] = prev.get("outputs", {})
            self.on_event(unit.name, "skipped", prev)
            stage_run.set_tags({f"heygen_ray.{unit.name}.status": "skipped"})
            return {"stage": unit.name, "status": "skipped", "key": key, "metric": prev.get("metric"),
                    "seconds": 0.0, "previous_seconds": prev.get("seconds")}
        resume = None
        if fresh:
            if os.path.isdir(unit.run_dir) and unit.stage in ("train", "tune", "compress"):
                shutil.rmtree(unit.run_dir)  # another config (or --force): start afresh
        elif prev.get("status") in ("running", "failed"):
            resume = prev  # the same unit, unfinished: resume from its checkpoint and MLflow run
        self.ledger.record(unit.name, key=key, status="running", stage=unit.stage, started_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.on_event(unit.name, "resuming" if resume else "started", {})
        t0 = time.perf_counter()
        try:
            outputs, metric = getattr(self, f"_run_{unit.stage}")(unit, stage_run, resume)
        except BaseException as err:
            self.ledger.record(unit.name, status="failed", error=str(err).splitlines()[0][:500] if str(err) else repr(err),
                               seconds=round(time.perf_counter() - t0, 2))

            self.on_event(unit.name, "failed", {"error": str(err), "ray_logs": ray_private.logs_dir()})
            raise
        seconds = round(time.perf_counter() - t0, 2)
        self.outputs[unit.name] = outputs
        self.ledger.record(unit.name, status="finished", outputs=outputs, metric=metric, seconds=seconds,
                           resumed=bool(resume), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        stage_run.log_metrics({f"{unit.name}.seconds": seconds})
        self.on_event(unit.name, "finished", {"seconds": seconds, "metric": metric})
        return {"stage": unit.name, "status": "resumed" if resume else "ran", "key": key, "metric": metric, "seconds": seconds}

    def _stage_tracking(self, base: Optional[Dict[str, Any]], parent: Optional[str]) -> Dict[str, Any]:
        """A stage's tracking section: the pipeline's store and experiment, nested under ``parent``
        (MLflow shows a child run under its parent only within one experiment); off when the pipeline's is."""
        t = dict(base or {})
        on = bool(self.tracking_uri)
        t.update(enabled=on and t.get("enabled", True), tracking_uri=self.tracking_uri, parent_run_id=parent if on else None,
                 experiment=self.spec.tracking.experiment)
        return t

    def _manifest_path(self) -> Optional[str]:
        d = self.spec.data
        if d.video.manifest:
            return fsutil.absolute(d.video.manifest)
        if d.synth is not None:
            return os.path.join(fsutil.absolute(d.synth.output_dir), "manifest.parquet")
        return None

    # -- stages ------------------------------------------------------------------------------------
    def _run_data(self, unit: Unit, stage_run: Any, resume: Any):
        from heygen_ray.data.stage import run_data_stage

        summary = run_data_stage(unit.spec, on_progress=self.on_progress)
        manifest = summary["video"]["manifest"]
        clips = sum(s["clips"] for s in summary["video"]["splits"].values())
        dropped = sum(s["dropped"] for s in summary["video"]["splits"].values())
        stage_run.log_metrics({"clips": clips, "dropped": dropped, "text_sequences": summary["text"]["sequences"]})
        out = {"manifest": manifest, "fingerprint": data_fingerprint(self._manifest_path()), "clips": clips,
               "dropped": dropped, "num_classes": summary["video"]["num_classes"], "summary": summary}
        return out, f"{clips} clips, {dropped} dropped"

    def _run_train(self, unit: Unit, stage_run: Any, resume: Any):
        from heygen_ray.train.driver import run_training
        from heygen_ray.train.prepare import task_for

        entry = unit.name.split(".", 1)[1]
        for dep in unit.deps[1:] if unit.deps[:1] == ["data"] else unit.deps:
            o = self.outputs.get(dep) or {}
            if dep.startswith("train.") and not o.get("champion"):
                raise RuntimeError(f"{unit.name} reads the {self.spec.champion_alias!r} of {dep} "
                                   f"({o.get('registered_model_name')}), which did not pass its gate "
                                   f"({o.get('metric')}={o.get('value')}): nothing to build on")
        d = unit.spec.to_dict()
        # a resumed training continues its run where it was nested (its params include the parent)
        parent = (resume or {}).get("mlflow_parent_run_id") or (stage_run.run_id if self.tracking_uri else None)
        d["tracking"] = self._stage_tracking(d.get("tracking"), parent)
        spec = TrainSpec.from_dict(d, source=unit.name)
        # the training's MLflow run is opened here and kept in the ledger, so a resubmission after a
        # crash continues the same run (run_training reopens it) as it continues the checkpoints
        run_id = (resume or {}).get("mlflow_run_id")
        if run_id is None and spec.tracking.enabled:
            from heygen_ray import tracking

            tr = tracking.make_tracker(spec.tracking.to_dict(), unit.run_dir, run_name=entry)
            tr.start()
            run_id = tr.run_id
        self.ledger.record(unit.name, run_dir=unit.run_dir, mlflow_run_id=run_id, mlflow_parent_run_id=parent)
        with _Poller(unit.name, self.on_progress, spec.steps):
            res = run_training(spec, callbacks=[_train_progress_callback(unit.name, spec.steps)], mlflow_run_id=run_id)
        task = task_for(spec)
        metric_name = f"val_{'ema_' if spec.ema.enabled else ''}{task.primary_metric}"
        value = res.metrics.get(metric_name)
        # smoke sizes check the plumbing, not the learning: their gates are reported, not applied
        gate = None if self.spec.smoke else self.spec.train[entry].gate
        passes = _gate_passes(gate, res.metrics)
        champion = passes and _set_champion(res.registered_model_name, res.model_version,
                                            self.spec.champion_alias, self.tracking_uri)
        out = {k: getattr(res, k) for k in ("model_uri", "registered_model_name", "model_version", "checkpoint_uri",
                                             "mlflow_run_id", "run_dir", "seconds")}
        out.update(task=spec.task, metric=metric_name, value=value, champion=bool(champion), passes_gate=passes,
                   gate="not applied (smoke)" if self.spec.smoke and self.spec.train[entry].gate else None,
                   # the final validation metrics (raw and EMA): what the model learned, in results.json
                   metrics={k: v for k, v in res.metrics.items() if k.startswith("val_")},
                   champion_uri=model_uri(res.registered_model_name, alias=self.spec.champion_alias) if champion else None)
        return out, f"{metric_name}={value:.4g}" if isinstance(value, (int, float)) else None

    def _run_tune(self, unit: Unit, stage_run: Any, resume: Any):
        from heygen_ray.tune.sweep import run_sweep

        d = unit.spec.to_dict()
        d["tracking"] = self._stage_tracking(d.get("tracking"), stage_run.run_id)
        res = run_sweep(SweepSpec.from_dict(d, source="tune"))
        champion = _set_champion(res.registered_model_name, res.model_version, self.spec.champion_alias,
                                 self.tracking_uri)
        best = res.best.to_dict() if res.best else {}
        out = {"best": best, "metric": res.metric, "trials": res.trials, "trials_completed": res.trials_completed,
               "trials_stopped_early": res.trials_stopped_early, "best_config_path": res.best_config_path,
               "registered_model_name": res.registered_model_name, "model_version": res.model_version,
               "model_uri": res.model_uri, "champion": bool(champion),
               "champion_uri": model_uri(res.registered_model_name, alias=self.spec.champion_alias) if champion else None}
        metric = f"best {res.metric}={best.get('metric'):.4g} ({res.trials} trials)" if best else None
        return out, metric

    def _run_compress(self, unit: Unit, stage_run: Any, resume: Any):
        from heygen_ray.compress.stage import run_compression

        teacher = self.outputs.get(unit.deps[0]) or {}
        uri = (model_uri(teacher['registered_model_name'], version=teacher['model_version'])
               if teacher.get("model_version") else teacher.get("checkpoint_uri"))
        if not uri:
            raise RuntimeError(f"compress: the teacher {unit.deps[0]} left no registered model or checkpoint")
        d = unit.spec.to_dict()
        d["teacher"] = uri
        d["tracking"] = self._stage_tracking(d.get("tracking"), stage_run.run_id)
        res = run_compression(CompressSpec.from_dict(d, source="compress")).to_dict()
        rows = {r["variant"]: r for r in res["variants"]}
        final = rows[res["final_variant"]]
        name = d.get("registered_model_name")
        versions = res.get("versions") or {}
        alias_variant = res["alias_variant"]
        # smoke sizes check the plumbing: a dozen distillation steps cannot hold a learned teacher's
        # quality, so, as for the trainings, the gate is reported, not applied (the final variant serves)
        gate = "not applied (smoke)" if self.spec.smoke else None
        if self.spec.smoke and alias_variant is None:
            if _set_champion(name, versions.get(res["final_variant"]), self.spec.champion_alias, self.tracking_uri):
                alias_variant = res["final_variant"]
        out = {"teacher_uri": uri, "final_variant": res["final_variant"], "alias_variant": alias_variant, "gate": gate,
               "registered_model_name": name, "versions": versions, "results_path": res["results_path"],
               "champion": bool(alias_variant) and bool(name),
               "champion_uri": model_uri(name, alias=self.spec.champion_alias) if alias_variant and name else None,
               "figures": {v: {k: r.get(k) for k in ("quality", "p50_ms_bs1", "speedup_bs1_vs_fp32", "speedup_bs1_vs_bf16",
                                                      "params", "size_bytes", "passes_gate")} for v, r in rows.items()}}
        metric = (f"{res['final_variant']}: {final.get('speedup_bs1_vs_fp32', 0):.2f}x vs fp32, "
                  f"quality {final['quality']:.3f} (teacher {rows['teacher_fp32']['quality']:.3f})")
        return out, metric

    def _run_evaluate(self, unit: Unit, stage_run: Any, resume: Any):
        """Score the champion of ``unit.deps[0]`` on this entry's data; the results and any expected
        minimums (met or not) go into the stage outputs."""
        from heygen_ray.evaluate import evaluate_model

        name = unit.name.split(".", 1)[1]
        ev = self.spec.evaluate[name]
        o = self.outputs.get(unit.deps[0]) or {}
        uri = o.get("champion_uri") or (model_uri(o['registered_model_name'], version=o['model_version'])
                                        if o.get("registered_model_name") and o.get("model_version") else None)
        if uri is None:
            raise RuntimeError(f"evaluate.{name}: {ev.model} registered no model to evaluate")
        res = evaluate_model(uri, unit.spec, split=ev.split, tracking_uri=self.tracking_uri)
        m = res["metrics"]
        checks = {k: {"value": m.get(k), "min": v, "passed": isinstance(m.get(k), (int, float)) and m[k] >= v}
                  for k, v in (ev.min_value or {}).items()}
        stage_run.log_metrics({f"{name}.{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        os.makedirs(unit.run_dir, exist_ok=True)
        with open(os.path.join(unit.run_dir, "results.json"), "w") as f:
            json.dump({**res, "checks": checks}, f, indent=2, default=str)
        out = {"model": uri, "manifest": res["manifest"], "split": ev.split, "rows": res["rows"],
               "dropped": res["dropped"], "metrics": m, "checks": checks}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k in (ev.min_value or {}) or k in ("accuracy", "recall_at_1"))
        return out, f"{uri} on {res['rows']} clips: {shown or 'scored'}"

    def _run_serve(self, unit: Unit, stage_run: Any, resume: Any):
        """Deploy every endpoint's champion (the compression variants multiplexed by name), send one
        request per endpoint, and leave Serve running (or shut it down: serve.keep_running)."""
        from heygen_ray import serve
        from heygen_ray.config import SERVE_ENDPOINTS, ServeSpec

        ref = self.spec.serve
        d = json.loads(json.dumps(unit.spec))
        d["tracking_uri"] = self.tracking_uri
        if self.spec.data.synth is not None:  # {"uri": ...} requests may read the pipeline's clips
            d["allowed_uri_root"] = fsutil.absolute(self.spec.data.synth.output_dir)
        served: Dict[str, Any] = {}
        for ep in SERVE_ENDPOINTS:
            src = getattr(ref, ep)
            section = endpoint_section(d, ep)
            if src is None:
                section["model"] = None
                continue
            o = self.outputs.get(src) or {}
            uri = o.get("champion_uri") or (model_uri(o['registered_model_name'], version=o['model_version'])
                                            if o.get("registered_model_name") and o.get("model_version") else None)
            if uri is None:
                raise RuntimeError(f"serve.{ep}: {src} registered no model to serve (tracking off, or its gate failed "
                                   "and no version exists)")
            section["model"] = uri
            if src == "compress":  # every measured variant, by name, plus a bf16 cast of the champion
                section["variants"] = {"bf16": "bf16", **{v: model_uri(o['registered_model_name'], version=ver)
                                                          for v, ver in (o.get("versions") or {}).items() if ver}}
            served[ep] = {"source": src, "model": uri, "variants": sorted(section.get("variants") or {})}
        spec = ServeSpec.from_dict(d, source=f"pipeline serve ({ref.config})")
        info = serve.deploy(spec)
        url = info["url"]
        try:
            smoke = serve.smoke(url, spec)
        except BaseException:
            serve.shutdown()
            raise
        # unset: a smoke run checks the plumbing and shuts Serve down; a real one leaves it serving
        running = ref.keep_running if ref.keep_running is not None else not self.spec.smoke
        if not running:
            serve.shutdown()
        elif not os.environ.get("RAY_ADDRESS"):
            log_note = ("Serve lives in this process's local Ray and stops when the pipeline exits: start a cluster "
                        "(make cluster-up) and submit to it to keep it running")
            self.on_event("serve", "note", {"message": log_note})
        stage_run.log_metrics({f"smoke_{k}_ms": v["latency_ms"] for k, v in smoke.items()})
        out = {"url": url, "running": running, "endpoints": served,
               "smoke": {k: {**v, "ok": v.get("status") == 200} for k, v in smoke.items()}}
        ok = sum(1 for v in out["smoke"].values() if v["ok"])
        return out, f"{ok}/{len(out['smoke'])} smoke requests OK at {url}" + ("" if running else " (shut down)")

def run_pipeline(spec: PipelineSpec, *, force: Sequence[str] = (), on_progress: Optional[Progress] = None,
                 on_event: Optional[Callable[[str, str, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Plan (validate every stage), then run the units in order on the Ray this process joined
    (``runtime.init_ray(spec.ray)`` first); writes <output_dir>/results.json."""
    run = PipelineRun(spec, force=force, on_progress=on_progress, on_event=on_event)
    result = run.run()
    path = os.path.join(run.out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    result["results_path"] = path
    return result
