"""Score a registered model of any task on any manifest (``heygen-ray evaluate``).

The model comes from the registry (or a logged model directory) with what it recorded when it was
logged: its task and the data it was trained on (label names, clip shape, tokenizer). The data is a
`DataSpec` like every stage's (a manifest of the user's own videos, or the embedded set with another
seed); one split of it is decoded by the same Ray Data pipeline as training and scored by the same
task metrics as training's own validation, so the two agree to the last digit on the same split.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Optional

from heygen_ray import fsutil
from heygen_ray.config import ConfigError, DataSpec
from heygen_ray.train.tasks import DataInfo
from heygen_ray.uris import is_model_uri


def _dataset(task_name: str, task: Any, data: DataSpec, info: DataInfo, split: Optional[str]):
    """(Ray dataset of the split with the task's columns, the VideoPipeline or None, rows)."""
    if task_name == "language_modeling":
        from heygen_ray.data.text import TextPipeline

        ds = TextPipeline.from_spec(data.text).lm_dataset()
        return ds, None, None
    from heygen_ray.data.video import VideoPipeline

    pipe = VideoPipeline.from_spec(data.video)
    split = split if "split" in pipe.table.column_names else None
    rows = pipe.rows(split).num_rows
    if rows == 0:
        raise ConfigError(f"--split {split}: the manifest {pipe.manifest_uri} has no rows in that split")
    if task_name == "video_classification":
        return pipe.dataset(split, columns=list(task.columns), cache=False), pipe, rows
    from heygen_ray.data.text import TextPipeline

    columns = ["video", "caption"] + (["label"] if "label" in task.columns else [])
    clips = pipe.dataset(split, columns=columns, cache=False)
    text = TextPipeline.from_spec(data.text.model_copy(update={"tokenizer_dir": info.tokenizer_dir}))
    return text.add_caption_tokens(clips, drop_caption=True), pipe, rows


def _check_labels(model_labels: Optional[list], pipe: Any) -> None:
    data_labels = pipe.label_names if pipe is not None else None
    if model_labels and data_labels and list(model_labels) != list(data_labels):
        raise ConfigError(f"the model's labels {model_labels[:4]}... are not the data's {data_labels[:4]}... "
                          f"({pipe.manifest_uri}): a classifier scores only data of its own classes")


def evaluate_model(model_uri: str, data: DataSpec, *, split: Optional[str] = "test", tracking_uri: Optional[str] = None,
                   batch_size: int = 32, judge_uri: Optional[str] = None, precision: Optional[str] = None) -> Dict[str, Any]:
    """Metrics of ``model_uri`` on ``split`` of ``data`` (the whole manifest when it has no split
    column; language models score every packed sequence of ``data.text.corpus``). Needs Ray (the
    data pipeline). ``judge_uri``: a registered video classifier judging a text_to_video model.
    ``precision``: fp32 or bf16 (autocast) for a float model; None: the precision its training ran
    (and validated) with, so the scores match the training's own evaluation. An int8 variant runs
    as it is served."""
    import torch

    from heygen_ray.config import TrainSpec
    from heygen_ray.data.text import recorded_tokenizer_dir
    from heygen_ray.tracking import load_model_and_config, load_model_config, recorded, recorded_data_info, resolve_model_uri
    from heygen_ray.train.precision import amp_dtype
    from heygen_ray.train.prepare import load_judge, task_for
    from heygen_ray.train.step import evaluate

    t0 = time.perf_counter()
    if data.synth is not None and not fsutil.exists(data.video.manifest or ""):
        from heygen_ray.data.synthetic import generate_dataset

        generate_dataset(data.synth)
    try:
        cfg = load_model_config(model_uri, tracking_uri=tracking_uri)
        extra = cfg.get("extra") or {}
        served_as_is = bool(extra.get("int8_artifact")) or cfg.get("dtype") == "bfloat16"
        if served_as_is and is_model_uri(model_uri):
            from heygen_ray.serve.loader import load_variant  # a compressed int8/bf16 variant: scored as it is served

            model, _ = load_variant(model_uri, tracking_uri=tracking_uri, compile_int8=False)
        else:
            model, _ = load_model_and_config(model_uri, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 (unknown name, alias or path)
        raise ConfigError(f"--model: cannot load {model_uri!r}: {err}") from None
    task_name = recorded(cfg, "task", tracking_uri=tracking_uri)
    if not task_name:
        raise ConfigError(f"--model: {model_uri} records no task (was it logged by heygen-ray training?)")
    trained_on = recorded_data_info(cfg, tracking_uri=tracking_uri)
    info = DataInfo(**{k: v for k, v in trained_on.items() if k in DataInfo.__dataclass_fields__})
    info.tokenizer_dir = recorded_tokenizer_dir(trained_on)  # the model's own tokenizer, embedded in it
    if task_name in ("text_to_video", "video_text_matching") and not (info.tokenizer_dir and fsutil.exists(
            fsutil.join(info.tokenizer_dir, "tokenizer.json"))):
        info.tokenizer_dir = fsutil.absolute(data.text.tokenizer_dir or "")  # the model's own is gone: the data's
    spec_d: Dict[str, Any] = {"task": task_name}
    if judge_uri:
        spec_d["judge"] = {"model": judge_uri}
    spec = TrainSpec.from_dict(spec_d, source="evaluate")
    judge = load_judge(spec, info, tracking_uri) if judge_uri else None
    task = task_for(spec, judge)
    int8 = bool(extra.get("int8_artifact"))
    # a training's model records the precision it validated with; a compressed variant runs as stored
    precision = "fp32" if served_as_is else (precision or extra.get("precision") or "fp32")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision: {precision!r} is not one of fp32, bf16")
    dtype = amp_dtype(precision)

    def amp():
        return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    ds, pipe, rows = _dataset(task_name, task, data, info, split)
    _check_labels(info.label_names, pipe)
    if pipe is not None and pipe.label_names:
        info.label_names, info.num_classes = pipe.label_names, len(pipe.label_names)
    batches = ds.iter_torch_batches(batch_size=batch_size, dtypes=dict(task.dtypes))
    scored = evaluate({"model": model}, batches, task, info, torch.device("cpu"), amp)
    metrics, _ = scored["model"]
    stats = pipe.stats(split if pipe is not None and "split" in pipe.table.column_names else None) if pipe is not None else {}
    ref = None
    if is_model_uri(model_uri):
        with contextlib.suppress(Exception):
            ref = resolve_model_uri(model_uri, tracking_uri=tracking_uri)
    return {
        "model": model_uri, "registered_name": getattr(ref, "name", None), "version": getattr(ref, "version", None),
        "run_id": getattr(ref, "run_id", None), "task": task_name, "split": split,
        "manifest": getattr(pipe, "manifest_uri", None), "corpus": data.text.corpus if pipe is None else None,
        "rows": rows, "precision": "int8" if int8 else ("bf16" if served_as_is else precision),
        "decoded": stats.get("decoded"), "dropped": stats.get("dropped"),
        "dropped_examples": stats.get("dropped_examples"), "judge": judge_uri,
        "metrics": metrics, "seconds": round(time.perf_counter() - t0, 2),
    }
