"""The tasks on (clip, tokenized caption) pairs (pure PyTorch; no Ray, no MLflow): text-to-video with its
judge and video quality metrics, and video-text matching with its retrieval recall."""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from heygen_ray.registry import TASKS
from heygen_ray.train.task_base import DataInfo, Task


class CaptionedClipTask(Task):
    """The batch contract of tasks on (clip, tokenized caption) pairs: text_to_video and
    video_text_matching."""

    columns = ("video", "caption_ids", "caption_mask")
    dtypes = {"video": torch.uint8, "caption_ids": torch.int64, "caption_mask": torch.bool}
    # model argument <- DataInfo field, for the overrides the data dictates
    OVERRIDES: Tuple[Tuple[str, str], ...] = ()

    def model_overrides(self, info: DataInfo) -> Dict[str, Any]:
        values = ((key, getattr(info, field)) for key, field in self.OVERRIDES)
        return {key: int(value) for key, value in values if value}

    def example_batch(self, info: DataInfo, batch_size: int = 2) -> Dict[str, torch.Tensor]:
        return {"video": torch.zeros(batch_size, info.clip_frames, info.height, info.width, 3, dtype=torch.uint8),
                "caption_ids": torch.zeros(batch_size, info.caption_tokens, dtype=torch.int64),
                "caption_mask": torch.ones(batch_size, info.caption_tokens, dtype=torch.bool)}

    def units_per_sample(self, info):
        return "frames", int(info.clip_frames or 1)


@TASKS.register("text_to_video")
class TextToVideoTask(CaptionedClipTask):
    """Caption -> clip. Loss: VideoGenerationLoss (pixel + weight-free perceptual + temporal).
    Metrics: PSNR, SSIM and temporal consistency (L1 between consecutive-frame differences), and the
    same for a baseline that always predicts the mean training clip, so progress is visible.

    Training and evaluation run the model with ``outputs="all"``: {"video", "trajectory"} (a sprite
    generator's object path, which anchors the aligned pixel loss and feeds the trajectory term)."""

    name = "text_to_video"
    primary_metric = "psnr"
    forward_kwargs = {"outputs": "all"}
    OVERRIDES = (("vocab_size", "vocab_size"), ("max_sequence_length", "caption_tokens"), ("max_frames", "clip_frames"),
                 ("video_height", "height"), ("video_width", "width"))

    MEDIA_SAMPLES = 4  # validation captions rendered at each evaluation

    def __init__(self, loss_weights: Optional[Dict[str, Any]] = None, discriminator: Optional[Dict[str, Any]] = None,
                 judge: Optional["Judge"] = None, judged: bool = False) -> None:
        """``judge``: the Judge that scores evaluations; ``judged``: one will be attached (a driver
        plans the data for it without loading the judge model)."""
        from heygen_ray.losses import PatchDiscriminator3D, VideoGenerationLoss

        self.judge = judge
        if judge is not None or judged:  # the judge compares against the clips' labels
            self.columns = CaptionedClipTask.columns + ("label",)
            self.dtypes = {**CaptionedClipTask.dtypes, "label": torch.int64}

        weights = dict(loss_weights or {})
        disc = None
        if weights.get("adversarial_loss_weight", 0.0) > 0:
            d = discriminator or {}
            disc = PatchDiscriminator3D(base_channels=d.get("base_channels", 32), num_layers=d.get("num_layers", 3),
                                        temporal_downsample_layers=d.get("temporal_downsample_layers", 1))
        self.criterion = VideoGenerationLoss(**weights, discriminator=disc)
        self.discriminator = disc

    def inputs(self, batch):
        from heygen_ray.data.transforms import video_to_float

        return {"input_ids": batch["caption_ids"], "attention_mask": batch["caption_mask"]}, video_to_float(batch["video"])

    def loss(self, outputs, targets, step=None):
        trajectory = outputs.get("trajectory") if isinstance(outputs, dict) else None
        return self.criterion(self.prediction(outputs), targets, step=step, trajectory=trajectory)[0]

    def prediction(self, outputs):
        return outputs["video"] if isinstance(outputs, dict) else outputs

    def discriminator_loss(self, outputs: torch.Tensor, targets: torch.Tensor,
                           discriminator: torch.nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Hinge loss of ``discriminator`` (the DDP-wrapped one while training) on real clips vs
        detached generated ones, in one forward over both (one DDP forward per backward)."""
        from heygen_ray.losses import discriminator_hinge_loss

        logits = discriminator(torch.cat([targets, outputs.detach().to(targets.dtype)], dim=0))
        real, fake = logits.float().chunk(2, dim=0)
        loss = discriminator_hinge_loss(real, fake)
        return loss, {"d_loss": loss.detach(), "d_real": real.mean().detach(), "d_fake": fake.mean().detach()}

    def new_metrics(self, info):
        state = {k: torch.zeros((), dtype=torch.float64) for k in
                 ("count", "psnr", "ssim", "temporal", "baseline_psnr", "baseline_ssim", "baseline_temporal")}
        state["mean_clip"] = torch.tensor(info.mean_clip, dtype=torch.float32) if info.mean_clip is not None else None
        if self.judge is not None:
            state["judge"] = self.judge.new_state(info)
        return state

    def update_metrics(self, state, outputs, targets, batch=None):
        pred, tgt = self.prediction(outputs).detach().float().clamp(-1, 1), targets.float()
        preds = {"": pred}
        if state["mean_clip"] is not None:
            preds["baseline_"] = state["mean_clip"].to(tgt.device).unsqueeze(0).expand_as(tgt)
        for prefix, p in preds.items():
            m = video_quality(p, tgt)
            for k, v in m.items():
                state[prefix + k] += v.sum().double().cpu()
        state["count"] += float(tgt.shape[0])
        if self.judge is not None:
            if batch is None or "label" not in batch:
                raise ValueError("the text_to_video judge needs the batch's label column")
            self.judge.update(state["judge"], pred, tgt, batch["label"], batch["caption_ids"], batch["caption_mask"])

    def compute_metrics(self, state):
        n = max(float(state["count"]), 1.0)
        baseline = ["baseline_psnr", "baseline_ssim", "baseline_temporal"] if state["mean_clip"] is not None else []
        keys = ["psnr", "ssim", "temporal"] + baseline
        out = {k: float(state[k]) / n for k in keys}
        out["samples"] = float(state["count"])
        if self.judge is not None:
            out.update(self.judge.compute(state["judge"]))
        return out

    @torch.no_grad()
    def media(self, model, batch, info):
        """[generated | real] side by side, one row per caption, as mp4 and GIF, a PNG strip of 4 of its
        frames (time runs left to right), plus the captions."""
        from heygen_ray.data.media import encode_gif, encode_mp4, encode_png, frame_strip, side_by_side, to_uint8

        was_training = model.training
        model.eval()
        inputs, targets = self.inputs(batch)
        generated = model(**inputs).float().clamp(-1, 1).cpu().numpy()
        model.train(was_training)
        real = targets.float().cpu().numpy()
        grid = side_by_side([[to_uint8(g), to_uint8(r)] for g, r in zip(generated, real)])
        fps = 4
        files = {"samples.mp4": encode_mp4(grid, fps), "samples.gif": encode_gif(grid, fps),
                 "samples_strip.png": encode_png(frame_strip(grid, every=max(1, grid.shape[0] // 4)))}
        captions = decode_captions(batch["caption_ids"], batch["caption_mask"], info)
        files["captions.txt"] = ("rows top to bottom; left: generated, right: real\n"
                                 + "".join(f"{i}: {c}\n" for i, c in enumerate(captions))).encode()
        return files


class Judge:
    """Does a generated clip show what its caption says? Two checks over the validation captions:

    - a registered video classifier (the judge) classifies the generated clip; it is right when it
      names the caption's own label (shape x direction on the embedded set). Its accuracy on the real
      clips of the same captions is reported beside it, as the ceiling;
    - the generated object's dominant colour (`losses.dominant_colour`) is the colour the caption
      names (captions naming none of ``palette``'s colours are left out of this check).

    ``model`` is any callable video -> logits with the same clip shape; ``judge_labels`` its label
    names, matched by name to the data's (``DataInfo.label_names``)."""

    def __init__(self, model: torch.nn.Module, judge_labels: List[str], palette: Dict[str, Tuple[int, int, int]],
                 tokenizer_dir: Optional[str] = None) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.judge_labels = list(judge_labels)
        self.palette_names = list(palette)
        self.palette = torch.tensor([palette[n] for n in self.palette_names], dtype=torch.float32)
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None

    def new_state(self, info: DataInfo) -> Dict[str, Any]:
        if not info.label_names:
            raise ValueError("the judge needs the data's label names (a manifest label column with labels.json)")
        unknown = sorted(set(info.label_names) - set(self.judge_labels))
        if unknown:
            raise ValueError(f"the judge does not know the data's labels {unknown[:5]} (it knows {self.judge_labels[:5]}...)")
        state = {k: 0.0 for k in ("n", "right", "real_right", "colour_n", "colour_right", "colour_real_right")}
        state.update(names=list(info.label_names), parts=[0.0, 0.0], info=info)
        return state

    def _caption_colours(self, ids: torch.Tensor, mask: torch.Tensor, info: DataInfo) -> List[int]:
        """Palette index of the first colour word of each caption (-1: none)."""
        words = [set(c.lower().split()) for c in decode_captions(ids, mask, info)]
        return [next((i for i, n in enumerate(self.palette_names) if n in w), -1) for w in words]

    @torch.no_grad()
    def update(self, state: Dict[str, Any], generated: torch.Tensor, real: torch.Tensor, labels: torch.Tensor,
               caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> None:
        from heygen_ray.losses import dominant_colour

        device = next(self.model.parameters()).device
        names = state["names"]
        truth = [names[int(i)] for i in labels.cpu()]
        for key, video in (("right", generated), ("real_right", real)):
            pred = self.model(video=video.to(device).float()).argmax(-1).cpu()
            said = [self.judge_labels[int(i)] for i in pred]
            state[key] += float(sum(a == b for a, b in zip(said, truth)))
            if key == "right":  # per part of "<shape>_<direction>"-style names
                for k in (0, 1):
                    state["parts"][k] += float(sum(len(a.split("_")) == 2 and a.split("_")[k] == b.split("_")[k]
                                                   for a, b in zip(said, truth)))
        state["n"] += float(len(truth))
        wanted = torch.tensor(self._caption_colours(caption_ids, caption_mask, state["info"]))
        has = wanted >= 0
        for key, video in (("colour_right", generated), ("colour_real_right", real)):
            got = dominant_colour(video.cpu(), self.palette)
            state[key] += float(((got == wanted) & has).sum())
        state["colour_n"] += float(has.sum())

    def compute(self, state: Dict[str, Any]) -> Dict[str, float]:
        n, c = max(state["n"], 1.0), max(state["colour_n"], 1.0)
        out = {"judge_accuracy": state["right"] / n, "judge_real_accuracy": state["real_right"] / n,
               "judge_chance": 1.0 / max(len(state["names"]), 1)}
        if all(len(x.split("_")) == 2 for x in state["names"]):
            out.update(judge_shape_accuracy=state["parts"][0] / n, judge_direction_accuracy=state["parts"][1] / n)
        if state["colour_n"]:
            out.update(colour_accuracy=state["colour_right"] / c, colour_real_accuracy=state["colour_real_right"] / c)
        return out


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str):
    from heygen_ray.data.text import TextTokenizer

    return TextTokenizer.load(tokenizer_dir)


def decode_captions(ids: torch.Tensor, mask: torch.Tensor, info: DataInfo) -> List[str]:
    """Token ids back to text with the run's tokenizer (ids as strings when there is none)."""
    rows = [row[m].tolist() for row, m in zip(ids.cpu(), mask.cpu().bool())]
    if not info.tokenizer_dir:
        return [" ".join(map(str, r)) for r in rows]
    tok = _tokenizer(info.tokenizer_dir)
    return [tok.decode(r) for r in rows]


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


@TASKS.register("video_text_matching")
class VideoTextMatchingTask(CaptionedClipTask):
    """Does the caption describe the clip? Contrastive loss over the batch (both directions, duplicate
    captions as shared positives) plus the fused match head on the hardest in-batch negatives.
    Metrics: caption -> video recall@1/@5 over the whole validation split (and the chance level of
    the same split, for reference), match-head accuracy on positives and hardest negatives (balanced
    over the two classes, so 0.5 is chance)."""

    name = "video_text_matching"
    primary_metric = "recall_at_1"
    OVERRIDES = (("vocab_size", "vocab_size"), ("max_sequence_length", "caption_tokens"), ("num_frames", "clip_frames"),
                 ("image_size", "height"))
    forward_kwargs = {"outputs": "all"}
    KS = (1, 5)

    def __init__(self, contrastive_weight: float = 1.0, match_weight: float = 1.0) -> None:
        self.contrastive_weight, self.match_weight = contrastive_weight, match_weight

    def inputs(self, batch):
        from heygen_ray.data.transforms import video_to_float

        return ({"video": video_to_float(batch["video"]), "input_ids": batch["caption_ids"],
                 "attention_mask": batch["caption_mask"]}, batch["caption_ids"])

    def loss(self, outputs, targets, step=None):
        from heygen_ray.losses import contrastive_loss, match_loss

        v, t = outputs["video_embeddings"].float(), outputs["text_embeddings"].float()
        total = self.contrastive_weight * contrastive_loss(outputs["logit_scale"] * (t @ v.t()), outputs["positives"])
        if self.match_weight > 0:
            total = total + self.match_weight * match_loss(outputs["match_positive"], outputs["match_negative"],
                                                           outputs["negative_valid"])
        return total

    def new_metrics(self, info):
        return {"video": [], "text": [], "ids": [], "loss_sum": torch.zeros((), dtype=torch.float64),
                **{k: torch.zeros((), dtype=torch.float64) for k in ("tp", "positives", "tn", "negatives")}}

    def update_metrics(self, state, outputs, targets, batch=None):
        state["video"].append(outputs["video_embeddings"].detach().float().cpu())
        state["text"].append(outputs["text_embeddings"].detach().float().cpu())
        state["ids"].append(targets.detach().cpu())
        b = targets.shape[0]
        state["loss_sum"] += float(self.loss(outputs, targets)) * b
        pos, neg = outputs["match_positive"].detach().cpu(), outputs["match_negative"].detach().cpu()
        valid = outputs["negative_valid"].detach().cpu()
        state["tp"] += float((pos > 0).sum())
        state["positives"] += float(pos.numel())
        state["tn"] += float(((neg <= 0) & valid).sum())
        state["negatives"] += float(valid.sum())

    def compute_metrics(self, state):
        from heygen_ray.models.composite import same_caption

        if not state["video"]:
            return {"samples": 0.0}
        v, t, ids = torch.cat(state["video"]), torch.cat(state["text"]), torch.cat(state["ids"])
        positives = same_caption(ids)  # padding ids are equal too, so whole rows compare
        out = retrieval_recall(t @ v.t(), positives, self.KS)
        out.update({f"chance_{k}": v for k, v in chance_recall(positives, self.KS).items()})
        n = float(ids.shape[0])
        out.update({"loss": float(state["loss_sum"]) / n, "samples": n,
                    # balanced over the two classes: 0.5 for a head that always says the same
                    "match_accuracy": 0.5 * (float(state["tp"]) / max(float(state["positives"]), 1.0)
                                             + float(state["tn"]) / max(float(state["negatives"]), 1.0))})
        return out


def retrieval_recall(similarity: torch.Tensor, positives: torch.Tensor, ks: Tuple[int, ...] = (1, 5)) -> Dict[str, float]:
    """Caption -> video recall@k: the share of captions (rows of ``similarity``, (N_text, N_video))
    with at least one positive video among their k most similar. ``positives`` (N_text, N_video)
    bool: duplicate captions make every one of their clips a right answer."""
    n_video = similarity.shape[1]
    order = similarity.float().argsort(dim=1, descending=True, stable=True)  # ties: lower index first
    hits = positives.gather(1, order)  # (N_text, N_video), True where the ranked video is a positive
    return {f"recall_at_{k}": float(hits[:, : min(k, n_video)].any(dim=1).float().mean()) for k in ks}


def chance_recall(positives: torch.Tensor, ks: Tuple[int, ...] = (1, 5)) -> Dict[str, float]:
    """Expected recall@k of a random ranking: 1 - C(N - p, k) / C(N, k) per caption, averaged."""
    n = positives.shape[1]
    p = positives.sum(dim=1).tolist()
    out = {}
    for k in ks:
        k = min(k, n)
        out[f"recall_at_{k}"] = sum(1.0 - math.comb(n - int(pi), k) / math.comb(n, k) for pi in p) / max(len(p), 1)
    return out
