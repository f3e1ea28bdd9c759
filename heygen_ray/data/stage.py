"""The data stage: generate the embedded set when absent, then run both pipelines and measure them."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from heygen_ray import fsutil
from heygen_ray.config import DataSpec


def run_data_stage(
    spec: DataSpec,
    *,
    regenerate: bool = False,
    on_progress: Optional[Callable[[str, int, int], None]] = None,
) -> Dict[str, Any]:
    """Run the data stage on the current Ray cluster; returns a JSON-able summary."""
    from heygen_ray.data.synthetic import generate_dataset
    from heygen_ray.data.text import TextPipeline
    from heygen_ray.data.video import VideoPipeline

    summary: Dict[str, Any] = {"synth": None}
    manifest = fsutil.absolute(spec.video.manifest or "")
    if spec.synth is not None and (regenerate or not fsutil.exists(manifest)):
        res = generate_dataset(spec.synth, on_progress=(lambda d, n: on_progress("synth", d, n)) if on_progress else None)
        summary["synth"] = res.to_dict()

    video = VideoPipeline.from_spec(spec.video)
    summary["video"] = {"manifest": video.manifest_uri, "num_classes": video.num_classes,
                        "label_names": video.label_names, "splits": {}}
    # every split in one pass (one pool of decoder actors: starting one per split cost more than
    # decoding the validation and test splits), counted per split from the rows' split column
    has_split = "split" in video.table.column_names
    columns = ["video", *(c for c in ("label", "split") if c in video.table.column_names)]
    n_rows = video.rows(None).num_rows
    counts: Dict[str, int] = {}
    shapes: Dict[str, Any] = {}
    t0 = time.perf_counter()
    done = 0
    for batch in video.dataset(None, columns=columns).iter_batches(batch_size=32, batch_format="numpy"):
        names = [str(x) for x in batch["split"]] if has_split else ["all"] * len(batch["video"])
        for name in names:
            counts[name] = counts.get(name, 0) + 1
            shapes.setdefault(name, list(batch["video"].shape[1:]))
        done += len(names)
        if on_progress:
            on_progress("video", done, n_rows)
    dt = time.perf_counter() - t0
    stats = video.warn_dropped(None)
    summary["video"]["seconds"] = round(dt, 2)
    summary["video"]["clips_per_second"] = round(done / dt, 1) if dt > 0 else None
    summary["video"]["dropped"] = stats["dropped"]
    summary["video"]["dropped_examples"] = stats["dropped_examples"]
    summary["video"]["dropped_reasons"] = stats["dropped_reasons"]
    for split in (["train", "val", "test"] if has_split else ["all"]):
        rows = video.rows(split if has_split else None).num_rows
        if rows == 0:
            continue
        summary["video"]["splits"][split] = {"clips": counts.get(split, 0), "shape": shapes.get(split), "dtype": "uint8",
                                             "dropped": rows - counts.get(split, 0)}

    t0 = time.perf_counter()
    text = TextPipeline.from_spec(spec.text)
    tok_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_seq, seq_len = 0, None
    for batch in text.lm_dataset().iter_batches(batch_size=256, batch_format="numpy"):
        n_seq += len(batch["input_ids"])
        seq_len = int(batch["input_ids"].shape[1]) if len(batch["input_ids"]) else seq_len
    dt = time.perf_counter() - t0
    summary["text"] = {
        "tokenizer_dir": text.tokenizer_dir, "vocab_size": text.tokenizer.vocab_size,
        "tokenizer_trained_now": text.trained_tokenizer, "tokenizer_seconds": round(tok_seconds, 2),
        "sequences": n_seq, "seq_len": seq_len, "tokens": n_seq * (seq_len or 0), "seconds": round(dt, 2),
        "tokens_per_second": round(n_seq * (seq_len or 0) / dt, 1) if dt > 0 else None,
    }
    return summary
