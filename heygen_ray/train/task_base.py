"""The task contract (pure PyTorch; no Ray, no MLflow): what the data tells a model (`DataInfo`) and
the `Task` interface every task implements (:mod:`heygen_ray.train.tasks`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch


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
    forward_kwargs: Dict[str, Any] = {}  # extra keyword arguments of the training/eval forward
    discriminator: Optional[torch.nn.Module] = None  # a GAN task's discriminator (trained by the loop)

    def model_overrides(self, info: DataInfo) -> Dict[str, Any]:
        """Overrides the data dictates (classes, vocabulary); the YAML's overrides win over none of these."""
        return {}

    def attach_student(self, model: torch.nn.Module) -> None:
        """Called once with the model about to be trained (unwrapped, after its EMA copy is made): a
        task that reads the model's own forwards (hidden-state distillation) hooks in here."""

    def example_batch(self, info: DataInfo, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def inputs(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def loss(self, outputs: Any, targets: torch.Tensor, step: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def prediction(self, outputs: Any) -> torch.Tensor:
        """The model's prediction among its training/eval outputs (all of them for most tasks)."""
        return outputs

    def new_metrics(self, info: DataInfo) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def update_metrics(self, state: Dict[str, torch.Tensor], outputs: torch.Tensor, targets: torch.Tensor,
                       batch: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Add one batch to ``state``; ``batch`` (when given) is the whole batch, for metrics that need
        more than the targets."""
        raise NotImplementedError

    def compute_metrics(self, state: Dict[str, torch.Tensor]) -> Dict[str, float]:
        raise NotImplementedError

    def units_per_sample(self, info: DataInfo) -> Tuple[str, int]:
        """(name, count) of the throughput unit: frames for video, tokens for text."""
        return "samples", 1

    def samples(self, model: torch.nn.Module, info: DataInfo) -> Optional[str]:
        """A text artifact showing what the model does (None when the task has none)."""
        return None

    def media(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], info: DataInfo) -> Dict[str, bytes]:
        """Files showing what the model makes of a fixed validation ``batch`` ({name: bytes}; empty
        when the task has none)."""
        return {}
