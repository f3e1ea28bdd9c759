"""The training driver: build the datasets, check the model against them, launch the TorchTrainer.

Everything that can be wrong with a spec fails here, before any worker starts. Re-running a job with
the same ``name`` and ``run_dir`` resumes it from its latest checkpoint (Ray Train V2 semantics).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from heygen_ray import fsutil
from heygen_ray.config import ConfigError, TrainSpec
from heygen_ray.train import track
from heygen_ray.train.result import TrainResult
from heygen_ray.train.tasks import DataInfo, Task
from heygen_ray.uris import is_model_uri, model_uri

log = logging.getLogger(__name__)


def absolutize(spec: TrainSpec) -> TrainSpec:
    """Local relative paths -> absolute (Train workers chdir into their own run folders), under the
    spec's ``storage`` root when it sets one (else $HEYGEN_RAY_STORAGE, else the current directory)."""
    from heygen_ray import runtime

    if spec.storage:
        runtime.use_storage(spec.storage)
    d = spec.to_dict()
    d["run_dir"] = fsutil.absolute(d["run_dir"])
    data = d["data"]
    if data.get("synth"):
        data["synth"]["output_dir"] = fsutil.absolute(data["synth"]["output_dir"])
    for section, key in (("video", "manifest"), ("text", "corpus"), ("text", "tokenizer_dir")):
        if data[section].get(key):
            data[section][key] = fsutil.absolute(data[section][key])
    return TrainSpec.from_dict(d)


def measure_matmul_peak(dtype_name: str = "fp32", threads: int = 1, n: int = 1024, iters: int = 8,
                        cache: bool = True) -> float:
    """FLOP/s of a square matmul on this CPU with ``threads`` threads (the MFU denominator per worker),
    measured once per host (:mod:`heygen_ray.hostcache`; ``cache=False`` measures now): a re-measure on
    a machine busy with the previous run's shutdown reads low and would inflate MFU."""
    from heygen_ray.hostcache import cached_measure

    if not cache:
        return _time_matmul(dtype_name, threads, n, iters)
    key = {"dtype": dtype_name, "threads": threads, "n": n, "iters": iters}
    return cached_measure("matmul-peak", key, lambda: _time_matmul(dtype_name, threads, n, iters))[0]


def _time_matmul(dtype_name: str, threads: int, n: int, iters: int) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[dtype_name]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    return 2.0 * n**3 * iters / dt


def peak_flops_for(precision: str, threads: int) -> Dict[str, float]:
    """Measured matmul peak per precision the workers may train in (the MFU denominators): for
    ``auto`` fp32, plus bf16 where this CPU has hardware bf16 (the workers pick one of the two)."""
    from heygen_ray.train.precision import bf16_cpu_support, cpu_flags

    if precision != "auto":
        return {precision: measure_matmul_peak(precision, threads=threads)}
    names = ["fp32"] + (["bf16"] if bf16_cpu_support(cpu_flags()) else [])
    return {name: measure_matmul_peak(name, threads=threads) for name in names}


def prepare_data(spec: TrainSpec, task: Task, *, lazy: bool = False) -> Tuple[Dict[str, Any], DataInfo]:
    """Build the Ray datasets for the task (generating the embedded set if it is configured and absent).
    ``lazy``: the caller needs only the DataInfo, so no video split is decoded and cached here."""
    data = spec.data
    if data.synth is not None and not fsutil.exists(data.video.manifest or ""):
        from heygen_ray.data.synthetic import generate_dataset

        log.warning("generating the embedded data set in %s", data.synth.output_dir)
        generate_dataset(data.synth)
    if spec.task == "video_classification":
        from heygen_ray.data.video import VideoPipeline

        pipe = VideoPipeline.from_spec(data.video)
        if "label" not in pipe.table.column_names:
            raise ConfigError(f"data.video.manifest: {pipe.manifest_uri} has no label column (video.columns.label)")
        info = DataInfo(num_classes=pipe.num_classes, label_names=pipe.label_names, clip_frames=data.video.clip_frames,
                        height=data.video.height, width=data.video.width,
                        train_rows=pipe.rows("train").num_rows, val_rows=pipe.rows("val").num_rows)
        rows = {"train": info.train_rows, "val": info.val_rows}
        datasets = {split: pipe.dataset(split, columns=list(task.columns), cache=not lazy and data.video.cache_split(split, n))
                    for split, n in rows.items() if split == "train" or n}
        return datasets, info
    from heygen_ray.data.text import TextPipeline

    if spec.task in ("text_to_video", "video_text_matching"):  # clips with tokenized captions
        from heygen_ray.data.video import VideoPipeline

        pipe = VideoPipeline.from_spec(data.video)
        if "caption" not in pipe.table.column_names:
            raise ConfigError(f"data.video.manifest: {pipe.manifest_uri} has no caption column (video.columns.caption)")
        text = TextPipeline.from_spec(data.text)
        info = DataInfo(clip_frames=data.video.clip_frames, height=data.video.height, width=data.video.width,
                        vocab_size=text.tokenizer.vocab_size, pad_id=text.tokenizer.pad_id,
                        caption_tokens=data.text.caption_max_tokens, tokenizer_dir=text.tokenizer_dir,
                        train_rows=pipe.rows("train").num_rows, val_rows=pipe.rows("val").num_rows,
                        num_classes=pipe.num_classes, label_names=pipe.label_names)
        columns = ["video", "caption"]
        if "label" in task.columns:  # a judged text_to_video
            if "label" not in pipe.table.column_names:
                raise ConfigError(f"judge: the manifest {pipe.manifest_uri} has no label column to judge against")
            columns.append("label")
        datasets = {}
        for split in ("train", "val"):
            if split == "val" and not info.val_rows:
                continue
            # cache (when asked) after tokenizing, so the decoded clips are held once
            clips = pipe.dataset(split, columns=columns, cache=False)
            ds = text.add_caption_tokens(clips, drop_caption=True)
            rows = info.train_rows if split == "train" else info.val_rows
            datasets[split] = ds.materialize() if not lazy and data.video.cache_split(split, rows) else ds
        if spec.task == "text_to_video":
            info.mean_clip = mean_clip(datasets["train"])
        return datasets, info

    text = TextPipeline.from_spec(data.text)
    packed = text.lm_dataset().materialize()  # text is small; a 10% hold-out of packed sequences for validation
    train, val = packed.train_test_split(test_size=0.1, seed=spec.seed)
    info = DataInfo(vocab_size=text.tokenizer.vocab_size, pad_id=text.tokenizer.pad_id, seq_len=data.text.seq_len,
                    tokenizer_dir=text.tokenizer_dir, train_rows=train.count(), val_rows=val.count())
    return {"train": train, "val": val}, info


def mean_clip(ds, max_clips: int = 512) -> list:
    """The mean training clip as float (C, T, H, W) in [-1, 1] (the text-to-video baseline)."""
    import numpy as np

    total, n = None, 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        v = batch["video"].astype(np.float64)  # (B, T, H, W, C)
        total = v.sum(0) if total is None else total + v.sum(0)
        n += len(v)
        if n >= max_clips:
            break
    mean = (total / max(n, 1)) / 127.5 - 1.0  # (T, H, W, C)
    return mean.transpose(3, 0, 1, 2).astype(np.float32).tolist()


def _pinned(uri: str, field: str, tracking_uri: Optional[str]) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (other URIs unchanged); an unknown name or
    alias fails naming ``field``."""
    if not is_model_uri(uri) or "@" not in uri:
        return uri
    from heygen_ray.tracking import resolve_model_uri

    try:
        ref = resolve_model_uri(uri, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 (an unknown name or alias: the config's error)
        raise ConfigError(f"{field}: {uri!r} is not in the registry at {tracking_uri}: {err}") from None
    return model_uri(ref.name, version=ref.version)


def pin_model_refs(spec: TrainSpec, tracking_uri: Optional[str]) -> TrainSpec:
    """The registered models a training reads (``model.init_from.uri``, ``judge.model``) pinned to
    versions, so every worker (and a restarted one) uses the same weights even if an alias moves."""
    d = spec.to_dict()
    if spec.model.init_from is not None:
        d["model"]["init_from"]["uri"] = _pinned(spec.model.init_from.uri, "model.init_from.uri", tracking_uri)
    if spec.judge is not None:
        d["judge"]["model"] = _pinned(spec.judge.model, "judge.model", tracking_uri)
    return TrainSpec.from_dict(d)


def check_judge(spec: TrainSpec, info: DataInfo, tracking_uri: Optional[str]) -> None:
    """The judge (a registered video classifier) must take this data's clips and know its labels."""
    if spec.judge is None:
        return
    from heygen_ray.tracking import load_model_config, recorded_data_info

    try:
        cfg = load_model_config(spec.judge.model, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"judge.model: cannot load {spec.judge.model!r}: {err}") from None
    judged = recorded_data_info(cfg)
    shape = tuple(judged.get(k) for k in ("clip_frames", "height", "width"))
    if shape != (info.clip_frames, info.height, info.width):
        raise ConfigError(f"judge.model: {spec.judge.model} takes clips of (frames, height, width) {shape}, "
                          f"this data has {(info.clip_frames, info.height, info.width)}")
    missing = sorted(set(info.label_names or []) - set(judged.get("label_names") or []))
    if not info.label_names or missing:
        raise ConfigError(f"judge.model: {spec.judge.model} does not know the data's labels "
                          f"({missing[:5] or 'the data has none'})")


def check_model(spec: TrainSpec, task: Task, info: DataInfo, tracking_uri: Optional[str] = None) -> None:
    """Build the model on the meta device and run it on a batch of the data's shape: a mismatch fails
    here, naming model.overrides, instead of inside a worker; a warm start (model.init_from) that
    cannot load or fits no tensor fails here too."""
    import torch

    from heygen_ray.models import UnknownArgumentError
    from heygen_ray.train.prepare import apply_init_from, build_model

    if spec.model.init_from is not None:
        apply_init_from(build_model(spec, task, info), spec, tracking_uri)

    inputs, targets = task.inputs({k: v.to("meta") for k, v in task.example_batch(info, 2).items()})
    try:
        with torch.device("meta"):
            model = build_model(spec, task, info)
            task.loss(model(**inputs, **task.forward_kwargs), targets)
    except UnknownArgumentError as err:
        raise ConfigError(f"model.overrides: {err}") from None
    except (RuntimeError, ValueError, AssertionError) as err:
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        raise ConfigError(
            f"model {spec.model.name!r} does not fit the data {shapes}: {err}. Set model.overrides "
            "(e.g. num_frames / image_size / max_sequence_length) to match data.video or data.text."
        ) from None


def run_training(spec: TrainSpec, extra_config: Optional[Dict[str, Any]] = None, *, callbacks: Sequence[Any] = (),
                 mlflow_run_id: Optional[str] = None, prepared: Optional[Tuple[Dict[str, Any], DataInfo]] = None) -> TrainResult:
    """Train on the current Ray cluster; returns the job's :class:`TrainResult` (and writes it as
    ``<run_dir>/<name>/results.json``).

    ``extra_config`` (JSON-able) joins the workers' config (a `WorkerConfig`, validated here):
    ``init_model`` (a model directory to start from, e.g. a pruned student) and ``distill``
    ({teacher: model directory, temperature, alpha, hidden_weight}); any other key fails here.
    ``callbacks``: extra ``ray.train.UserCallback``s (a sweep trial passes Tune's report callback).
    ``mlflow_run_id``: continue that existing run instead of opening a new one (a retried trial).
    ``prepared``: (datasets, info) from ``prepare_data`` for this spec's data, prepared once by a
    sweep for all its trials."""
    from ray.data.dataset import MaterializedDataset
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from heygen_ray.train.loop import train_loop_per_worker
    from heygen_ray.train.prepare import task_for
    from heygen_ray.train.worker_config import WorkerConfig

    spec = absolutize(spec)
    task = task_for(spec)
    tracking_uri = track.resolved_uri(spec.tracking.to_dict(), os.path.join(spec.run_dir, spec.name))
    spec = pin_model_refs(spec, tracking_uri)
    datasets, info = prepared if prepared is not None else prepare_data(spec, task)
    check_model(spec, task, info, tracking_uri)
    check_judge(spec, info, tracking_uri)
    run_dir = os.path.join(spec.run_dir, spec.name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "spec.yaml"), "w") as f:
        f.write(spec.to_yaml())
    workers = max(spec.scaling.num_workers, 1)
    peak = spec.peak_flops or peak_flops_for(spec.precision, threads=max(1, int((os.cpu_count() or 1) / workers)))
    # validated before the MLflow run opens: a bad extra_config leaves no run behind
    worker = WorkerConfig.build(spec=spec, data_info=info, run_dir=run_dir, tracking_uri=tracking_uri,
                                has_val="val" in datasets, peak_flops=peak, extra=extra_config,
                                train_materialized=isinstance(datasets["train"], MaterializedDataset))

    mlflow_run_id = track.continue_or_start_run(spec.tracking.to_dict(), run_dir, run_name=spec.name, spec=spec.to_dict(),
                                                run_id=mlflow_run_id)
    worker = worker.model_copy(update={"mlflow_run_id": mlflow_run_id})
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        # a plain dict (what Ray Train expects of a loop config), validated again on every worker
        train_loop_config=worker.to_dict(),
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        run_config=RunConfig(
            # inside the run folder: deleting that folder (the pipeline does, for a changed or forced
            # unit) leaves Ray nothing to resume from; the same name with the folder kept resumes
            name=spec.name, storage_path=os.path.join(run_dir, "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            callbacks=list(callbacks) or None,
        ),
        datasets=datasets,
        # one worker reads the whole split: no split coordinator actor to start (a process importing Ray Data)
        dataset_config=DataConfig(datasets_to_split=["train"] if workers > 1 else []),
    )
    try:
        result = trainer.fit()
    except Exception:
        track.end_run(spec.tracking.to_dict(), run_dir, mlflow_run_id, status="FAILED")
        raise
    track.end_run(spec.tracking.to_dict(), run_dir, mlflow_run_id, status="FINISHED")
    value = dict(result.return_value or {})
    out = TrainResult.from_dict({
        **value,
        "name": spec.name, "task": spec.task, "model": spec.model.name, "run_dir": run_dir,
        "seconds": round(time.perf_counter() - t0, 2),
        "checkpoint_uri": result.checkpoint.path if result.checkpoint else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "mlflow_run_id": value.get("mlflow_run_id") or mlflow_run_id,
        "tracking_uri": track.resolved_uri(spec.tracking.to_dict(), run_dir),
    })
    path = os.path.join(run_dir, "results.json")
    with open(path, "w") as f:
        json.dump({k: v for k, v in out.to_dict().items() if k != "results_path"}, f, indent=2, default=str)
    out.results_path = path
    return out
