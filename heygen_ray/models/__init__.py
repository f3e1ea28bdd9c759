"""The model zoo: every model of the design in pure PyTorch (no ray, no mlflow), built by name.

    from heygen_ray.models import create_model, list_models, model_inputs
    model = create_model("vit_video_micro", num_classes=10)
    logits = model(**model_inputs(model, batch))

Importing this package registers the presets in `heygen_ray.registry.MODELS`; nothing else happens.

The contract every model keeps (`base.ModelBase`)
-------------------------------------------------
Inputs are keyword tensors named as in a batch dict; `model.input_names` lists the ones a model
takes (required first) and `model_inputs(model, batch)` picks them out of a larger batch:

    video             float (B, C, T, H, W) in [-1, 1]   video classifiers/encoders
    image             float (B, C, H, W)                 vit_*, swin_*, cnn_* image presets
    frame_features    float (B, T, D_in)                 temporal_transformer_*
    input_ids         int64 (B, L)                       text_decoder_*, text_processor_*
    attention_mask    bool  (B, L), True = real token    mask of the text sequence (input_ids or
                                                         text_embeddings); padding is excluded from
                                                         attention (as keys) and from pooling
    memory, memory_mask  float (B, M, D_m), bool (B, M)  cross-attention memory of a text decoder
    text_embeddings   float (B, L, D_t) (or (B, D_t))    multimodal_fusion_*, video_generator_*
    video_embeddings, video_mask  float (B, N, D_v), bool (B, N)   multimodal_fusion_*

Outputs of `forward` are one tensor:

    classifiers (vit, swin, cnn, *_video_*, conv_video_encoder, video_transformer, temporal_transformer)
                                   logits (B, num_classes)
    text_decoder_*                 next-token logits (B, L, vocab_size)
    text_processor_*, multimodal_fusion_*   (B, num_classes), i.e. the pooled (B, D) embedding
                                   when num_classes == 0 (their presets' default)
    video_generator_*              video (B, C, T, H, W) in [-1, 1] (the design's per-sample
                                   "T x C x H x W" in the batch-wide Conv3d layout)

and the rest of the interface is the same for all:

    forward_features(**inputs)     features before pooling/head ((B, N, D) tokens, (B, h, w, D)
                                   for Swin, (B, C, T, H, W) maps for the 3D CNN)
    forward_head(features, attention_mask=None, pre_logits=False)
                                   pool + head; pre_logits=True returns the pooled features
    get_classifier() / reset_classifier(n)   the output layer (the vocabulary projection of the LM;
                                   the output patch projection of the generator, n = channels);
                                   n == 0 gives an identity head where that makes sense
    set_grad_checkpointing(True)   non-reentrant activation checkpointing of every block
                                   (training mode only)
    flops_per_sample(inputs=None)  forward FLOPs for one sample (matmul/conv/attention, 2 per MAC)
    example_inputs(batch_size)     random keyword inputs of the preset's shapes
    num_classes, num_features      head width, pre-logits feature width
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from torch import nn

from heygen_ray.models import cnn, composite, fusion, generator, swin, temporal, text, video, vit  # noqa: F401  (registers presets)
from heygen_ray.models.base import ModelBase, UnknownArgumentError, create_model
from heygen_ray.models.cnn import ConvNet
from heygen_ray.models.fusion import MultimodalFusion, MultimodalFusionModule
from heygen_ray.models.generator import VideoGenerator
from heygen_ray.models.layers import AttentionMechanism, FeedForwardNetwork, MultiHeadCrossAttention, TransformerBlock
from heygen_ray.models.swin import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowedMultiHeadAttention
from heygen_ray.models.temporal import TemporalTransformer
from heygen_ray.models.text import TextProcessor, TextTransformerDecoder
from heygen_ray.models.video import ConvVideoEncoder, FrameVideoClassifier, VideoTransformerEncoder
from heygen_ray.models.vit import VisionTransformer
from heygen_ray.registry import MODELS


def list_models(pattern: str = "") -> List[str]:
    """Sorted registry names, optionally only those containing `pattern` (e.g. "_micro")."""
    return [n for n in MODELS.names() if pattern in n]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ModelBase inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while not isinstance(model, ModelBase):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} is not a heygen_ray model")
        model = inner
    return model


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of `batch` that `model.forward` takes (by `input_names`), e.g. without labels."""
    names = unwrap_model(model).input_names
    return {k: batch[k] for k in names if k in batch and batch[k] is not None}


__all__ = [
    "AttentionMechanism",
    "ConvNet",
    "ConvVideoEncoder",
    "FeedForwardNetwork",
    "FrameVideoClassifier",
    "ModelBase",
    "MultiHeadCrossAttention",
    "MultimodalFusion",
    "MultimodalFusionModule",
    "PatchMerging",
    "SwinTransformer",
    "SwinTransformerBlock",
    "TemporalTransformer",
    "TextProcessor",
    "TextTransformerDecoder",
    "TransformerBlock",
    "UnknownArgumentError",
    "VideoGenerator",
    "VideoTransformerEncoder",
    "VisionTransformer",
    "WindowedMultiHeadAttention",
    "create_model",
    "list_models",
    "model_inputs",
    "unwrap_model",
]
