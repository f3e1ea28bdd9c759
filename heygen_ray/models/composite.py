"""Composite models for the multimodal tasks, built from the zoo's parts (one ModelBase each, so
training, EMA, checkpoints and logging treat them like any other model).

`TextToVideo`: TextProcessor -> MultimodalFusion -> VideoGenerator (the design's text-to-video chain).
The fusion lets caption tokens attend to a small set of learned "video prior" tokens before they
condition the generator (by cross-attention and, by default, FiLM modulation of every generator block
from the pooled caption). forward(input_ids, attention_mask) -> video (B, C, T, H, W) in [-1, 1].
With ``generator_type="conv"`` (``text_to_video_conv_micro``) or ``"sprite"``
(``text_to_video_sprite_micro``) the caption becomes one embedding (a projection of the pooled text
tower, as a matcher has) that conditions a ConvVideoGenerator or a SpriteVideoGenerator.

`VideoTextMatching`: VideoTransformerEncoder (or any registered video classifier, ``video_model``) +
TextProcessor, each projected to a shared unit-norm
embedding for contrastive retrieval, and MultimodalFusion (caption tokens cross-attending to video
tokens) with a one-logit match head that scores a (caption, clip) pair.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from heygen_ray.models.base import ModelBase, build, masked_mean, random_token_inputs
from heygen_ray.models.fusion import MultimodalFusion
from heygen_ray.models.generator import ConvVideoGenerator, SpriteVideoGenerator, VideoGenerator
from heygen_ray.models.text import TextProcessor
from heygen_ray.models.video import VideoTransformerEncoder
from heygen_ray.registry import MODELS


def projection_head(in_features: int, out_features: int, kind: str = "linear") -> nn.Module:
    """Linear, or Linear -> ReLU -> Linear with a hidden width of 2 x out_features."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, 2 * out_features), nn.ReLU(), nn.Linear(2 * out_features, out_features))


class TextToVideo(ModelBase):
    input_names = ("input_ids", "attention_mask")

    def __init__(
        self,
        vocab_size: int = 512,
        max_sequence_length: int = 32,
        text_dimensions: int = 64,
        text_layers: int = 2,
        fusion_dimensions: int = 64,
        fusion_layers: int = 1,
        fusion_type: str = "cross_attention",
        video_prior_tokens: int = 8,
        generator_dimensions: int = 96,
        generator_layers: int = 3,
        num_attention_heads: int = 2,
        video_channels: int = 3,
        video_height: int = 32,
        video_width: int = 32,
        max_frames: int = 8,
        patch_size: int = 8,
        tubelet_size: int = 2,
        dropout_rate: float = 0.0,
        caption_modulation: bool = True,
        generator_type: str = "transformer",
        generator_channels: tuple = (48, 32, 16),
        text_projection: Optional[str] = None,
        embedding_dimensions: int = 128,
        sprite_size: Optional[int] = None,
        background_grid: int = 4,
        pooling_queries: int = 0,
        condition_tokens: str = "output",
    ) -> None:
        super().__init__()
        if generator_type not in ("transformer", "conv", "sprite"):
            raise ValueError(f"generator_type must be 'transformer', 'conv' or 'sprite', got {generator_type!r}")
        if condition_tokens not in ("output", "output+embedding"):
            raise ValueError(f"condition_tokens must be 'output' or 'output+embedding', got {condition_tokens!r}")
        if condition_tokens != "output" and (text_projection is not None or fusion_layers > 0):
            raise ValueError("condition_tokens='output+embedding' conditions on the text tower's tokens: "
                             "text_projection=None, fusion_layers=0")
        self.condition_tokens = condition_tokens
        if generator_type == "transformer" and (fusion_layers == 0 or text_projection is not None):
            raise ValueError("the transformer generator cross-attends to fused caption tokens: fusion_layers >= 1, "
                             "text_projection=None")
        self.max_sequence_length = max_sequence_length
        self.text = TextProcessor(vocab_size=vocab_size, hidden_dimensions=text_dimensions, num_layers=text_layers,
                                  num_attention_heads=num_attention_heads, max_sequence_length=max_sequence_length,
                                  dropout_rate=dropout_rate)
        # the caption as one unit vector (a matcher's text tower and projection, when warm-started from
        # one: a caption embedding that already separates colour, shape, motion and place)
        self.text_embed = projection_head(text_dimensions, embedding_dimensions, text_projection) if text_projection else None
        self.fusion: Optional[MultimodalFusion] = None
        if fusion_layers > 0:
            self.video_prior = nn.Parameter(torch.randn(1, video_prior_tokens, fusion_dimensions) * 0.02)
            self.fusion = MultimodalFusion(text_dimensions=text_dimensions, video_dimensions=fusion_dimensions,
                                           hidden_dimensions=fusion_dimensions, num_layers=fusion_layers,
                                           fusion_type=fusion_type, num_attention_heads=num_attention_heads,
                                           dropout_rate=dropout_rate)
        condition = embedding_dimensions if self.text_embed is not None else (
            fusion_dimensions if self.fusion is not None else text_dimensions * (2 if condition_tokens != "output" else 1))
        if generator_type == "conv":
            self.generator: ModelBase = ConvVideoGenerator(
                input_dimensions=condition, stage_channels=tuple(generator_channels), video_channels=video_channels,
                video_height=video_height, video_width=video_width, max_frames=max_frames)
        elif generator_type == "sprite":
            self.generator = SpriteVideoGenerator(
                input_dimensions=condition, sprite_size=sprite_size, background_grid=background_grid,
                video_channels=video_channels, video_height=video_height, video_width=video_width, max_frames=max_frames,
                pooling_queries=pooling_queries)
        else:
            self.generator = VideoGenerator(input_dimensions=condition, hidden_dimensions=generator_dimensions,
                                            num_layers=generator_layers, num_attention_heads=num_attention_heads,
                                            video_channels=video_channels, video_height=video_height,
                                            video_width=video_width, max_frames=max_frames, patch_size=patch_size,
                                            tubelet_size=tubelet_size, dropout_rate=dropout_rate,
                                            caption_modulation=caption_modulation)
        # No `self.head` alias of generator.head: a module registered under two names breaks
        # torch.func.functional_call (used for the FLOP count), which then restores only one of them.
        self.num_classes, self.num_features = video_channels, self.generator.num_features

    def condition(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, Df) fused caption tokens, or with a text projection the caption's unit embedding
        scaled to unit variance per dimension (B, E). ``condition_tokens="output+embedding"``: the text
        tower's output tokens beside its input ones (word + position embeddings) (B, L, 2 Dt): a word
        keeps its identity there however little the tower's training needed it (a matcher's text
        tower, frozen, separates colours only faintly in its outputs)."""
        tokens = self.text.forward_features(input_ids, attention_mask)  # (B, L, Dt)
        if self.condition_tokens == "output+embedding":  # both at unit scale (embeddings start at 0.02)
            words = self.text.embed(input_ids)
            return torch.cat([tokens, F.layer_norm(words, words.shape[-1:])], dim=-1)
        if self.fusion is not None:
            prior = self.video_prior.expand(input_ids.shape[0], -1, -1)  # (B, P, Df)
            tokens = self.fusion.forward_features(tokens, prior, attention_mask)  # (B, L, Df)
        if self.text_embed is None:
            return tokens
        e = F.normalize(self.text_embed(masked_mean(tokens, attention_mask)), dim=-1)  # (B, E)
        return e * math.sqrt(e.shape[-1])

    def forward_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.generator.forward_features(self.condition(input_ids, attention_mask), attention_mask)

    def forward_head(self, features, attention_mask=None, pre_logits: bool = False) -> torch.Tensor:
        return self.generator.forward_head(features, attention_mask, pre_logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, outputs: str = "video"):
        """-> video (B, C, T, H, W); ``outputs="all"`` (training) -> {"video", "trajectory"}: the
        trajectory (B, T, 2) of a sprite generator's object, None for the other generators."""
        if outputs not in ("video", "all"):
            raise ValueError(f"outputs must be 'video' or 'all', got {outputs!r}")
        features = self.forward_features(input_ids, attention_mask)
        if outputs == "video":
            return self.forward_head(features, attention_mask)
        if isinstance(self.generator, SpriteVideoGenerator):
            video, trajectory = self.generator.forward_head(features, attention_mask, return_trajectory=True)
            return {"video": video, "trajectory": trajectory}
        return {"video": self.forward_head(features, attention_mask), "trajectory": None}

    def get_classifier(self) -> nn.Module:
        return self.generator.head

    def reset_classifier(self, num_outputs: int) -> None:
        self.generator.reset_classifier(num_outputs)
        self.num_classes = num_outputs
        self._flops_cache.clear()

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        return random_token_inputs(batch_size, min(16, self.max_sequence_length), self.text.vocab_size, self._device())


@MODELS.register("text_to_video_micro")
def text_to_video_micro(**overrides: Any) -> TextToVideo:
    """Tiny text-to-video chain for 8 x 32 x 32 clips: text 64 x 2, fusion 64 x 1, generator 96 x 3."""
    return build(TextToVideo, overrides)


@MODELS.register("text_to_video_conv_micro")
def text_to_video_conv_micro(**overrides: Any) -> TextToVideo:
    """Text 64 x 2 -> MLP projection to a 128-d caption embedding -> ConvVideoGenerator (48-32-16) for
    8 x 32 x 32 clips. The text tower and projection have the names and shapes of
    `video_text_matching_cnn_micro`'s, so model.init_from can start them from a trained matcher."""
    return build(TextToVideo, overrides, fusion_layers=0, generator_type="conv", text_projection="mlp")


@MODELS.register("text_to_video_sprite_micro")
def text_to_video_sprite_micro(**overrides: Any) -> TextToVideo:
    """Text 64 x 2 (the names and shapes of `video_text_matching_cnn_micro`'s text tower, for
    model.init_from) -> its output tokens beside its word embeddings, pooled by 6 learned queries ->
    SpriteVideoGenerator (a 4 x 4 background and a 16-pixel sprite on a trajectory) for 8 x 32 x 32
    clips. Measured on the embedded set with the quickstart's frozen matcher tower: a mean-pooled
    caption embedding gave colour right in 71 % of clips; these tokens, 100 %."""
    return build(TextToVideo, overrides, fusion_layers=0, generator_type="sprite", text_projection=None,
                 pooling_queries=6, condition_tokens="output+embedding")


@MODELS.register("text_to_video_base")
def text_to_video_base(**overrides: Any) -> TextToVideo:
    """The design's sizes chained: text 768 x 12, fusion 768/512 -> 512, generator 768 x 12 for 16 x 224 x 224."""
    return build(TextToVideo, overrides, vocab_size=50000, max_sequence_length=512, text_dimensions=768, text_layers=12,
                 fusion_dimensions=512, fusion_layers=6, generator_dimensions=768, generator_layers=12,
                 num_attention_heads=12, video_height=224, video_width=224, max_frames=16, patch_size=16, tubelet_size=2)


def same_caption(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, L) token ids -> (B, B) bool: True where two rows hold the same caption (padding ignored).
    Duplicate captions are shared positives for contrastive training and retrieval."""
    ids = input_ids if attention_mask is None else input_ids.masked_fill(~attention_mask.bool(), -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def hardest_negatives(similarity: torch.Tensor, positives: torch.Tensor, sample: bool = False) -> tuple:
    """For each row, a column that is not a positive -> (index (B,), valid (B,) bool; False when every
    column is a positive). The most similar one, or with ``sample`` one drawn with probability
    softmax(similarity) over the negatives (ALBEF's hard-negative mining: the very hardest are often
    near-duplicates, e.g. the same scene at another speed)."""
    masked = similarity.detach().float().masked_fill(positives, float("-inf"))
    if sample:  # Gumbel-max: argmax(x + Gumbel noise) is a draw from softmax(x)
        u = torch.rand_like(masked).clamp_(1e-9, 1.0 - 1e-9)
        masked = masked - torch.log(-torch.log(u))
    index = masked.argmax(dim=1)
    valid = ~positives.all(dim=1)
    return index, valid


class VideoTextMatching(ModelBase):
    """Does a caption describe a clip? Two scores per (video_i, caption_i) pair.

    forward(video, input_ids, attention_mask) -> (B, 2): [:, 0] the fused match logit (caption
    tokens cross-attend to video tokens; > 0 means "matches"), [:, 1] the scaled cosine similarity of
    the two embeddings (the retrieval score). ``outputs="all"`` (training) returns a dict with the
    unit embeddings, the logit scale and the match logits of positive pairs and of the hardest
    in-batch negatives, so that DDP sees every parameter in one forward.
    """

    input_names = ("video", "input_ids", "attention_mask")

    def __init__(
        self,
        vocab_size: int = 512,
        max_sequence_length: int = 32,
        text_dimensions: int = 64,
        text_layers: int = 2,
        num_frames: int = 8,
        image_size: int = 32,
        patch_size: int = 8,
        tubelet_size: int = 2,
        video_dimensions: int = 64,
        video_layers: int = 2,
        fusion_dimensions: int = 64,
        fusion_layers: int = 1,
        fusion_type: str = "cross_attention",
        embedding_dimensions: int = 64,
        num_attention_heads: int = 2,
        in_channels: int = 3,
        temperature: float = 0.07,
        dropout_rate: float = 0.0,
        video_model: Optional[str] = None,
        video_overrides: Optional[Dict[str, Any]] = None,
        projection: str = "linear",
    ) -> None:
        super().__init__()
        if projection not in ("linear", "mlp"):
            raise ValueError(f"projection must be 'linear' or 'mlp', got {projection!r}")
        self.max_sequence_length = max_sequence_length
        if video_model is None:  # the built-in tower: a video transformer over tubelets
            self.video = VideoTransformerEncoder(num_frames=num_frames, image_size=image_size, in_channels=in_channels,
                                                 patch_size=patch_size, tubelet_size=tubelet_size,
                                                 embedding_dimensions=video_dimensions, num_layers=video_layers,
                                                 num_attention_heads=num_attention_heads, dropout_rate=dropout_rate,
                                                 num_classes=0)
        else:  # any registered video classifier as the tower (its tokens: forward_features, (B, N, D))
            from heygen_ray.models.base import create_model  # a registered tower, built by name

            self.video = create_model(video_model, **{"num_frames": num_frames, "image_size": image_size,
                                                      **(video_overrides or {}), "num_classes": 0})
        video_dimensions = self.video.num_features
        self.text = TextProcessor(vocab_size=vocab_size, hidden_dimensions=text_dimensions, num_layers=text_layers,
                                  num_attention_heads=num_attention_heads, max_sequence_length=max_sequence_length,
                                  dropout_rate=dropout_rate)
        # a nonlinear projection (SimCLR's) lets the shared space combine features non-additively, e.g.
        # where a clip starts from its mean position, direction and speed
        self.video_embed = projection_head(video_dimensions, embedding_dimensions, projection)
        self.text_embed = projection_head(text_dimensions, embedding_dimensions, projection)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))  # CLIP's learned temperature
        self.fusion = MultimodalFusion(text_dimensions=text_dimensions, video_dimensions=video_dimensions,
                                       hidden_dimensions=fusion_dimensions, num_layers=fusion_layers,
                                       fusion_type=fusion_type, num_attention_heads=num_attention_heads,
                                       dropout_rate=dropout_rate, num_classes=0)
        # the match head reads the fused caption (cross attention over the clip) and the element-wise
        # product of the two embeddings (a direct view of their agreement, which the cross attention,
        # starting near zero, takes long to learn on its own)
        self.match_head = nn.Linear(fusion_dimensions + embedding_dimensions, 1)
        self.num_classes, self.num_features = 2, embedding_dimensions

    def encode(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """-> video tokens (B, N, Dv), text tokens (B, L, Dt), unit embeddings (B, E) x 2."""
        v_tokens = self.video.forward_features(video)
        t_tokens = self.text.forward_features(input_ids, attention_mask)
        v_pooled = self.video.forward_head(v_tokens, pre_logits=True)
        t_pooled = masked_mean(t_tokens, attention_mask)
        # The embeddings every similarity is taken of stay fp32 under mixed precision: bf16 keeps 8
        # mantissa bits, so cosines of unit vectors carry ~1e-3 of rounding, which the learned logit
        # scale (up to 100) turns into logit noise as large as the gaps between captions that differ in
        # one word (measured: recall@1 0.49 instead of 0.81 at the test size in bf16). Two small linear
        # layers: no measurable cost.
        device = v_pooled.device.type
        with torch.autocast(device_type=device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext():
            v = F.normalize(self.video_embed(v_pooled.float()), dim=-1)
            t = F.normalize(self.text_embed(t_pooled.float()), dim=-1)
        return v_tokens, t_tokens, v, t

    def match(self, t_tokens: torch.Tensor, v_tokens: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Match logit (B,) of each (caption, clip) pair: tokens (B, L, Dt) / (B, N, Dv), embeddings (B, E)."""
        fused = self.fusion(t_tokens, v_tokens, attention_mask)  # (B, Df) masked mean of the fused caption
        return self.match_head(torch.cat([fused, t * v], dim=-1)).squeeze(-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def forward_features(self, video: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, _, v, t = self.encode(video, input_ids, attention_mask)
        return torch.stack([v, t], dim=1)  # (B, 2, E)

    def forward_head(self, features, attention_mask=None, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return features.mean(dim=1)  # (B, E)
        return (features[:, 0] * features[:, 1]).sum(-1, keepdim=True) * self.scale()

    def forward(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                outputs: str = "scores") -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        v_tokens, t_tokens, v, t = self.encode(video, input_ids, attention_mask)
        scale = self.scale()
        if outputs == "scores":
            cosine = (v * t).sum(-1) * scale
            return torch.stack([self.match(t_tokens, v_tokens, t, v, attention_mask), cosine], dim=-1)  # (B, 2)
        if outputs != "all":
            raise ValueError(f"outputs must be 'scores' or 'all', got {outputs!r}")
        b = video.shape[0]
        positives = same_caption(input_ids, attention_mask)  # (B, B)
        sim = (t @ v.t()) * scale  # (B_text, B_video)
        neg_video, valid_video = hardest_negatives(sim, positives, self.training)  # per caption: a wrong clip
        neg_text, valid_text = hardest_negatives(sim.t(), positives, self.training)  # per clip: a wrong caption
        # one fused pass over B positive + 2B negative pairs
        mask = attention_mask
        t_all = torch.cat([t_tokens, t_tokens, t_tokens[neg_text]], dim=0)
        v_all = torch.cat([v_tokens, v_tokens[neg_video], v_tokens], dim=0)
        e_t = torch.cat([t, t, t[neg_text]], dim=0)
        e_v = torch.cat([v, v[neg_video], v], dim=0)
        m_all = None if mask is None else torch.cat([mask, mask, mask[neg_text]], dim=0)
        logits = self.match(t_all, v_all, e_t, e_v, m_all)
        return {"video_embeddings": v, "text_embeddings": t, "logit_scale": scale, "positives": positives,
                "match_positive": logits[:b], "match_negative": logits[b:],
                "negative_valid": torch.cat([valid_video, valid_text])}

    def get_classifier(self) -> nn.Module:
        return self.match_head

    def reset_classifier(self, num_outputs: int) -> None:
        raise NotImplementedError("VideoTextMatching has fixed heads (a match logit and an embedding)")

    def example_inputs(self, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        tokens = random_token_inputs(batch_size, min(16, self.max_sequence_length), self.text.vocab_size, self._device())
        return {"video": self.video.example_inputs(batch_size)["video"], **tokens}


@MODELS.register("video_text_matching_micro")
def video_text_matching_micro(**overrides: Any) -> VideoTextMatching:
    """Tiny matcher for 8 x 32 x 32 clips: video transformer 64 x 2 (tubelet 2 x 8 x 8), text 64 x 2,
    cross-attention fusion 64 x 1, 64-d shared embedding."""
    return build(VideoTextMatching, overrides)


@MODELS.register("video_text_matching_cnn_micro")
def video_text_matching_cnn_micro(**overrides: Any) -> VideoTextMatching:
    """Matcher for 8 x 32 x 32 clips with the frame-difference CNN as video tower (`cnn_video_micro`,
    plus 64 position features: captions say where a clip starts), text 64 x 2, MLP projections to a
    128-d shared embedding. Warm-start its tower from a trained `cnn_video_micro` classifier
    (model.init_from with target_prefix "video.")."""
    return build(VideoTextMatching, overrides, video_model="cnn_video_micro", video_overrides={"position_features": 64},
                 projection="mlp", embedding_dimensions=128)


@MODELS.register("video_text_matching_base")
def video_text_matching_base(**overrides: Any) -> VideoTextMatching:
    """The design's sizes: video transformer 768 x 12 on 16 x 224 x 224, text 768 x 12, fusion 768 x 6, 512-d embedding."""
    return build(VideoTextMatching, overrides, vocab_size=50000, max_sequence_length=512, text_dimensions=768,
                 text_layers=12, num_frames=16, image_size=224, patch_size=16, video_dimensions=768, video_layers=12,
                 fusion_dimensions=768, fusion_layers=6, embedding_dimensions=512, num_attention_heads=12)
