"""Models for the Serve tests: the four task models (micro presets) trained for a few optimizer steps
in-process on the generated clips, logged and registered on a real MLflow server with the same
`log_model` the training job uses (model.json ``extra.data_info`` included), plus an int8_dynamic
variant registered the way the compression stage registers it."""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, List

import numpy as np
import pyarrow.parquet as pq
import torch

from heygen_ray.data.decode import decode_clip
from heygen_ray.data.text import encode_captions, train_tokenizer
from heygen_ray.models import create_model
from heygen_ray.tracking import log_model, make_tracker, set_alias
from heygen_ray.train.tasks import get_task

CLIP = dict(clip_frames=8, height=32, width=32)
CAPTION_TOKENS, SEQ_LEN = 24, 32
NAMES = {"classify": "serve-cls", "generate": "serve-t2v", "complete": "serve-lm", "match": "serve-match"}
INT8_VARIANT = "pruned_distilled_int8_dynamic"


def _batch(dataset, tok, n: int = 4) -> Dict[str, torch.Tensor]:
    table = pq.read_table(dataset.manifest).to_pylist()[:n]
    base = os.path.dirname(dataset.manifest)
    clips = [decode_clip(open(os.path.join(base, r["path"]), "rb").read(), CLIP["clip_frames"], CLIP["height"],
                         CLIP["width"], sampling="uniform")[0] for r in table]
    ids, mask = encode_captions(tok, [r["caption"] for r in table], CAPTION_TOKENS)
    return {"video": torch.from_numpy(np.stack(clips)), "label": torch.tensor([r["label"] for r in table]),
            "caption_ids": torch.from_numpy(ids.astype(np.int64)), "caption_mask": torch.from_numpy(mask)}


def _lm_batch(tok, corpus: str, n: int = 4) -> Dict[str, torch.Tensor]:
    import json

    docs = [json.loads(line)["text"] for line in open(corpus)][: n * 4]
    stream: List[int] = []
    for d in docs:
        stream += tok.encode(d) + [tok.eos_id]
    rows = np.asarray(stream[: n * (SEQ_LEN + 1)], dtype=np.int64).reshape(n, SEQ_LEN + 1)
    return {"input_ids": torch.from_numpy(rows[:, :-1]), "labels": torch.from_numpy(rows[:, 1:])}


def fit(model: torch.nn.Module, task_name: str, batch: Dict[str, torch.Tensor], steps: int = 2, lr: float = 3e-3):
    task = get_task(task_name)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        inputs, targets = task.inputs(batch)
        loss = task.loss(model(**inputs, **task.forward_kwargs), targets, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_and_register(tracking_uri: str, dataset, out_dir: str) -> Dict[str, Any]:
    """-> {"uris": {endpoint: models:/name@champion}, "models": {...}, "tokenizer_dir", "label_names", ...}"""
    torch.manual_seed(0)
    tok_dir = os.path.join(out_dir, "tokenizer")
    tok = train_tokenizer(dataset.corpus, tok_dir, vocab_size=300, min_frequency=1)
    label_names = __import__("json").load(open(dataset.labels))["label_names"]
    batch = _batch(dataset, tok)
    info = {**CLIP, "label_names": label_names, "num_classes": len(label_names), "tokenizer_dir": tok_dir,
            "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "caption_tokens": CAPTION_TOKENS, "seq_len": SEQ_LEN}
    specs = {
        "classify": ("video_classification", "vit_video_micro", {"num_classes": len(label_names)}, batch),
        "generate": ("text_to_video", "text_to_video_micro", {"vocab_size": tok.vocab_size, "max_sequence_length": CAPTION_TOKENS}, batch),
        "complete": ("language_modeling", "text_decoder_micro", {"vocab_size": tok.vocab_size, "max_sequence_length": SEQ_LEN},
                     _lm_batch(tok, dataset.corpus)),
        "match": ("video_text_matching", "video_text_matching_micro",
                  {"vocab_size": tok.vocab_size, "max_sequence_length": CAPTION_TOKENS}, batch),
    }
    track = {"tracking_uri": tracking_uri, "experiment": "serve-tests"}
    models, uris = {}, {}
    for endpoint, (task, name, overrides, b) in specs.items():
        model = fit(create_model(name, **overrides), task, b)
        with make_tracker(track, out_dir, run_name=f"train-{endpoint}") as t:
            logged = log_model(t, model, model_name=name, model_overrides=overrides, registered_model_name=NAMES[endpoint],
                               extra={"task": task, "precision": "fp32", "variant": "ema", "data_info": info})
        set_alias(NAMES[endpoint], "champion", logged.version, tracking_uri=tracking_uri)
        models[endpoint] = model
        uris[endpoint] = f"models:/{NAMES[endpoint]}@champion"
    # the compression stage's int8_dynamic registration: fp32 source weights in the registry, the
    # int8 state dict as the run artifact variant/int8_dynamic.pt, model.json naming both
    from heygen_ray.compress.quantize import quantize_int8_dynamic, save_int8_dynamic

    cls = models["classify"]
    q = quantize_int8_dynamic(copy.deepcopy(cls))
    path = save_int8_dynamic(q, os.path.join(out_dir, "int8_dynamic.pt"))
    with make_tracker(track, out_dir, run_name=INT8_VARIANT) as t:
        t.log_artifact(path, "variant")
        logged = log_model(t, cls, model_name="vit_video_micro", model_overrides=specs["classify"][2],
                           registered_model_name=NAMES["classify"],
                           extra={"variant": INT8_VARIANT, "int8_artifact": "int8_dynamic.pt",
                                  "lineage": {"parent_uri": f"models:/{NAMES['classify']}/1"}},
                           version_tags={"heygen_ray.variant": INT8_VARIANT})
    return {"uris": uris, "models": models, "tokenizer": tok, "tokenizer_dir": tok_dir, "label_names": label_names,
            "batch": batch, "int8_version": logged.version, "int8_model": q, "track": track}


def register_new_classifier(ctx: Dict[str, Any], tracking_uri: str, out_dir: str) -> str:
    """A second fp32 classifier version (two more steps of training); returns its version."""
    model = fit(copy.deepcopy(ctx["models"]["classify"]), "video_classification", ctx["batch"], steps=2, lr=1e-2)
    name = NAMES["classify"]
    overrides = {"num_classes": len(ctx["label_names"])}
    info = {**CLIP, "label_names": ctx["label_names"], "tokenizer_dir": ctx["tokenizer_dir"]}
    with make_tracker(ctx["track"], out_dir, run_name="train-classify-v2") as t:
        logged = log_model(t, model, model_name="vit_video_micro", model_overrides=overrides, registered_model_name=name,
                           extra={"task": "video_classification", "variant": "ema", "data_info": info})
    return logged.version
