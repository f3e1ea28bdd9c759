"""Tasks: a model family, a batch contract, a loss and metrics (pure PyTorch; no Ray, no MLflow).

A task turns a batch from the data pipeline into model inputs and targets, computes the loss, and
accumulates metrics as sums that can be all-reduced across workers before they are read.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from heygen_ray.registry import TASKS
from heygen_ray.train.multimodal import (  # noqa: F401  (re-exported; importing registers the tasks)
    CaptionedClipTask,
    Judge,
    TextToVideoTask,
    VideoTextMatchingTask,
    chance_recall,
    decode_captions,
    retrieval_recall,
    video_quality,
)
from heygen_ray.train.task_base import DataInfo, Task  # noqa: F401  (re-exported)


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

    def loss(self, outputs, targets, step=None):
        return F.cross_entropy(outputs.float(), targets)

    def new_metrics(self, info):
        k = int(info.num_classes or 1)
        return {"loss_sum": torch.zeros((), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64),
                "correct": torch.zeros((), dtype=torch.float64), "confusion": torch.zeros(k, k, dtype=torch.float64)}

    def update_metrics(self, state, outputs, targets, batch=None):
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

    def loss(self, outputs, targets, step=None):
        return F.cross_entropy(outputs.float().flatten(0, 1), targets.flatten())

    def new_metrics(self, info):
        return {"loss_sum": torch.zeros((), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64)}

    def update_metrics(self, state, outputs, targets, batch=None):
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


class DistillationTask(Task):
    """A classification task whose loss is `DistillationLoss` against a frozen teacher:
    alpha * KD(T) + (1 - alpha) * CE(labels) (alpha = 0: plain fine-tuning).

    The teacher runs inside `inputs` (eval mode, no_grad; outside DDP, never checkpointed), so the
    training loop is unchanged: targets become (labels, teacher logits), and metrics are the base
    task's on the labels. (no_grad rather than inference_mode: the teacher's logits enter the KD
    term's autograd graph as constants, which inference tensors may not.)"""

    def __init__(self, base: Task, teacher: torch.nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 hidden_weight: float = 0.0) -> None:
        from heygen_ray.losses import DistillationLoss

        self.base, self.teacher = base, teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.criterion = DistillationLoss(temperature=temperature, alpha=alpha, hidden_loss_weight=hidden_weight,
                                          hidden_loss="similarity")
        self.name, self.columns, self.dtypes = base.name, base.columns, base.dtypes
        self.primary_metric, self.primary_mode, self.forward_kwargs = base.primary_metric, base.primary_mode, base.forward_kwargs
        self._hidden: Dict[str, torch.Tensor] = {}
        if hidden_weight > 0:
            self._watch(self.teacher, "teacher")

    def _watch(self, model: torch.nn.Module, who: str) -> None:
        """Keep the pre-logits features (the classifier's input) of every forward of ``model``."""
        from heygen_ray.models import unwrap_model

        def hook(module, args, output):
            self._hidden[who] = args[0]

        unwrap_model(model).get_classifier().register_forward_hook(hook)

    def attach_student(self, model: torch.nn.Module) -> None:
        """Hidden-state distillation reads the student's features from its own (DDP) forward through
        a hook on its classifier. Call after the EMA copy is made (a deep copy would copy the hook)."""
        if self.criterion.hidden_loss_weight > 0:
            self._watch(model, "student")

    def model_overrides(self, info):
        return self.base.model_overrides(info)

    def example_batch(self, info, batch_size=2):
        return self.base.example_batch(info, batch_size)

    def inputs(self, batch):
        inputs, labels = self.base.inputs(batch)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).float()
        return inputs, (labels, teacher_logits)

    def loss(self, outputs, targets, step=None):
        labels, teacher_logits = targets
        hidden = {}
        if self.criterion.hidden_loss_weight > 0:
            hidden = {"student_hidden": self._hidden.get("student"), "teacher_hidden": self._hidden.get("teacher")}
        return self.criterion(outputs.float(), teacher_logits, labels, **hidden)[0]

    def new_metrics(self, info):
        return self.base.new_metrics(info)

    def update_metrics(self, state, outputs, targets, batch=None):
        self.base.update_metrics(state, outputs, targets[0], batch)

    def compute_metrics(self, state):
        return self.base.compute_metrics(state)

    def units_per_sample(self, info):
        return self.base.units_per_sample(info)


def get_task(name: str, **kwargs: Any) -> Task:
    """The task ``name`` (keyword arguments: the task's loss settings)."""
    return TASKS.get(name)(**kwargs)
