"""Tasks: a model family, a batch contract, a loss and metrics (pure PyTorch; no Ray, no MLflow).

A task turns a batch from the data pipeline into model inputs and targets, computes the loss, and
accumulates metrics as sums that can be all-reduced across workers before they are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from heygen_ray.registry import TASKS


@dataclass
class DataInfo:
    """What the model builder needs to know about the data (computed in the driver)."""

    num_classes: Optional[int] = None
    label_names: Optional[List[str]] = None
    clip_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    vocab_size: Optional[int] = None
    pad_id: Optional[int] = None
    seq_len: Optional[int] = None
    tokenizer_dir: Optional[str] = None
    caption_tokens: Optional[int] = None
    mean_clip: Optional[List[Any]] = None  # float (C, T, H, W) in [-1, 1]: the mean training clip
    train_rows: Optional[int] = None
    val_rows: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


class Task:
    name: str = ""
    columns: Tuple[str, ...] = ()
    dtypes: Dict[str, torch.dtype] = {}
    primary_metric: str = ""
    primary_mode: str = "max"

    def model_overrides(self, info: DataInfo) -> Dict[str, Any]:
        """Overrides the data dictates (classes, vocabulary); the YAML's overrides win over none of these."""
        return {}

    def example_batch(self, info: DataInfo, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def inputs(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_metrics(self, info: DataInfo) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def update_metrics(self, state: Dict[str, torch.Tensor], outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_metrics(self, state: Dict[str, torch.Tensor]) -> Dict[str, float]:
        raise NotImplementedError

    def units_per_sample(self, info: DataInfo) -> Tuple[str, int]:
        """(name, count) of the throughput unit: frames for video, tokens for text."""
        return "samples", 1

    def samples(self, model: torch.nn.Module, info: DataInfo) -> Optional[str]:
        """A text artifact showing what the model does (None when the task has none)."""
        return None


@TASKS.register("video_classification")
class VideoClassification(Task):
    name = "video_classification"
    columns = ("video", "label")
    dtypes = {"video": torch.uint8, "label": torch.int64}
    primary_metric = "accuracy"

    def model_overrides(self, info: DataInfo) -> Dict[str, Any]:
        return {"num_classes": int(info.num_classes)} if info.num_classes else {}

    def example_batch(self, info: DataInfo, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        return {"video": torch.zeros(batch_size, info.clip_frames, info.height, info.width, 3, dtype=torch.uint8),
                "label": torch.zeros(batch_size, dtype=torch.int64)}

    def inputs(self, batch):
        from heygen_ray.data.transforms import video_to_float

        return {"video": video_to_float(batch["video"])}, batch["label"]

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs.float(), targets)

    def new_metrics(self, info):
        k = int(info.num_classes or 1)
        return {"loss_sum": torch.zeros((), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64),
                "correct": torch.zeros((), dtype=torch.float64), "confusion": torch.zeros(k, k, dtype=torch.float64)}

    def update_metrics(self, state, outputs, targets):
        outputs = outputs.detach().float()
        state["loss_sum"] += F.cross_entropy(outputs, targets, reduction="sum").double().cpu()
        pred = outputs.argmax(-1)
        state["correct"] += (pred == targets).sum().double().cpu()
        state["count"] += float(targets.numel())
        k = state["confusion"].shape[0]
        idx = (targets.cpu() * k + pred.cpu()).long()
        state["confusion"] += torch.bincount(idx, minlength=k * k).reshape(k, k).double()

    def compute_metrics(self, state):
        n = max(float(state["count"]), 1.0)
        return {"loss": float(state["loss_sum"]) / n, "accuracy": float(state["correct"]) / n, "samples": float(state["count"])}

    def units_per_sample(self, info):
        return "frames", int(info.clip_frames or 1)


@TASKS.register("language_modeling")
class LanguageModeling(Task):
    name = "language_modeling"
    columns = ("input_ids", "labels")
    dtypes = {"input_ids": torch.int64, "labels": torch.int64}
    primary_metric = "perplexity"
    primary_mode = "min"

    def model_overrides(self, info: DataInfo) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if info.vocab_size:
            out["vocab_size"] = int(info.vocab_size)
        return out

    def example_batch(self, info: DataInfo, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        ids = torch.zeros(batch_size, info.seq_len, dtype=torch.int64)
        return {"input_ids": ids, "labels": ids.clone()}

    def inputs(self, batch):
        return {"input_ids": batch["input_ids"]}, batch["labels"]

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs.float().flatten(0, 1), targets.flatten())

    def new_metrics(self, info):
        return {"loss_sum": torch.zeros((), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64)}

    def update_metrics(self, state, outputs, targets):
        state["loss_sum"] += F.cross_entropy(outputs.detach().float().flatten(0, 1), targets.flatten(), reduction="sum").double().cpu()
        state["count"] += float(targets.numel())

    def compute_metrics(self, state):
        n = max(float(state["count"]), 1.0)
        loss = float(state["loss_sum"]) / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(state["count"])}

    def units_per_sample(self, info):
        return "tokens", int(info.seq_len or 1)

    PROMPTS = ("a red", "the clip shows a", "in this video the", "watch the")

    def samples(self, model, info):
        if not info.tokenizer_dir:
            return None
        from heygen_ray.data.text import TextTokenizer

        tok = TextTokenizer.load(info.tokenizer_dir)
        lines = []
        for prompt in self.PROMPTS:
            ids = torch.tensor([tok.encode(prompt)], dtype=torch.int64)
            out = greedy_generate(model, ids, max_new_tokens=24, max_length=info.seq_len or 64, stop_id=tok.eos_id)
            lines.append(f"{prompt!r} -> {tok.decode(out[0].tolist())!r}")
        return "\n".join(lines) + "\n"


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, ids: torch.Tensor, *, max_new_tokens: int, max_length: int,
                    stop_id: Optional[int] = None) -> torch.Tensor:
    """Greedy continuation of token ids (B, L) with a causal LM (no cache: fine for short samples)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = ids.to(device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids[:, -max_length:])  # (B, L, V)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if stop_id is not None and bool((nxt == stop_id).all()):
            break
    model.train(was_training)
    return ids


@TASKS.register("text_to_video")
class TextToVideoTask(Task):
    """Caption -> clip. Loss: VideoGenerationLoss (pixel + weight-free perceptual + temporal).
    Metrics: PSNR, SSIM and temporal consistency (L1 between consecutive-frame differences), and the
    same for a baseline that always predicts the mean training clip, so progress is visible."""

    name = "text_to_video"
    columns = ("video", "caption_ids", "caption_mask")
    dtypes = {"video": torch.uint8, "caption_ids": torch.int64, "caption_mask": torch.bool}
    primary_metric = "psnr"

    def __init__(self, loss_weights: Optional[Dict[str, float]] = None) -> None:
        from heygen_ray.losses import VideoGenerationLoss

        self.criterion = VideoGenerationLoss(**(loss_weights or {}))

    def model_overrides(self, info: DataInfo) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, value in (("vocab_size", info.vocab_size), ("max_sequence_length", info.caption_tokens),
                           ("max_frames", info.clip_frames), ("video_height", info.height), ("video_width", info.width)):
            if value:
                out[key] = int(value)
        return out

    def example_batch(self, info: DataInfo, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        return {"video": torch.zeros(batch_size, info.clip_frames, info.height, info.width, 3, dtype=torch.uint8),
                "caption_ids": torch.zeros(batch_size, info.caption_tokens, dtype=torch.int64),
                "caption_mask": torch.ones(batch_size, info.caption_tokens, dtype=torch.bool)}

    def inputs(self, batch):
        from heygen_ray.data.transforms import video_to_float

        return {"input_ids": batch["caption_ids"], "attention_mask": batch["caption_mask"]}, video_to_float(batch["video"])

    def loss(self, outputs, targets):
        return self.criterion(outputs, targets)[0]

    def new_metrics(self, info):
        state = {k: torch.zeros((), dtype=torch.float64) for k in
                 ("count", "psnr", "ssim", "temporal", "baseline_psnr", "baseline_ssim", "baseline_temporal")}
        state["mean_clip"] = torch.tensor(info.mean_clip, dtype=torch.float32) if info.mean_clip is not None else None
        return state

    def update_metrics(self, state, outputs, targets):
        pred, tgt = outputs.detach().float().clamp(-1, 1), targets.float()
        preds = {"": pred}
        if state["mean_clip"] is not None:
            preds["baseline_"] = state["mean_clip"].to(tgt.device).unsqueeze(0).expand_as(tgt)
        for prefix, p in preds.items():
            m = video_quality(p, tgt)
            for k, v in m.items():
                state[prefix + k] += v.sum().double().cpu()
        state["count"] += float(tgt.shape[0])

    def compute_metrics(self, state):
        n = max(float(state["count"]), 1.0)
        keys = ["psnr", "ssim", "temporal"] + (["baseline_psnr", "baseline_ssim", "baseline_temporal"] if state["mean_clip"] is not None else [])
        out = {k: float(state[k]) / n for k in keys}
        out["samples"] = float(state["count"])
        return out

    def units_per_sample(self, info):
        return "frames", int(info.clip_frames or 1)


def video_quality(prediction: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample PSNR (dB), SSIM and temporal consistency error for (B, C, T, H, W) in [-1, 1].
    temporal = mean |diff_t(prediction) - diff_t(target)| (0 when the motion matches exactly)."""
    from heygen_ray.losses import psnr, ssim

    dp, dt = torch.diff(prediction, dim=2), torch.diff(target, dim=2)
    return {
        "psnr": psnr(prediction, target, data_range=2.0, reduction="none"),
        "ssim": ssim(prediction, target, data_range=2.0, reduction="none"),
        "temporal": (dp - dt).abs().flatten(1).mean(1),
    }


def get_task(name: str, loss_weights: Optional[Dict[str, float]] = None) -> Task:
    cls = TASKS.get(name)
    return cls(loss_weights) if name == "text_to_video" else cls()
