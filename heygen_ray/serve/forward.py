"""What a Serve replica computes, as plain functions over the training code (no Serve in here, so the
unit tests and the serving benchmark call them directly): preprocessing (``Prep``: PyAV decoding, the
float conversion, the BPE tokenizer, all as recorded by training in model.json) and one forward
function per task."""


import logging
from typing import Any, Dict, List, Optional

import numpy as np

from heygen_ray.config import ServeEndpointSpec
from heygen_ray.serve.schemas import BadInputError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Preprocessing and model calls (pure functions over the training code)
# --------------------------------------------------------------------------------------------------


class Prep:
    """What turns a request into model inputs for one loaded model: the clip shape, tokenizer and
    label names recorded by training (model.json ``data_info``), gaps filled by the endpoint's
    ``preprocess`` section, then by the architecture itself."""

    def __init__(self, info: Dict[str, Any], cfg: ServeEndpointSpec, task: str) -> None:
        di, pp, arch = info.get("data_info") or {}, cfg.preprocess, info.get("arch")
        self.resize, self.fps = pp.resize, pp.fps
        self.label_names = di.get("label_names") or pp.label_names
        self.clip_frames = self.height = self.width = None
        if task in ("classify", "match"):
            dims = [di.get(k) or getattr(pp, k) for k in ("clip_frames", "height", "width")]
            if not all(dims):  # the architecture's own clip shape: (1, C, T, H, W)
                shape = tuple(arch.example_inputs(1)["video"].shape)[2:]
                dims = [d or s for d, s in zip(dims, shape)]
            self.clip_frames, self.height, self.width = (int(d) for d in dims)
        self.tokenizer = None
        if task in ("generate", "complete", "match"):
            from heygen_ray.data.text import TextTokenizer, recorded_tokenizer_dir

            tok_dir = pp.tokenizer_dir or recorded_tokenizer_dir(di)
            if not tok_dir:
                raise ValueError(f"{info.get('uri')}: no tokenizer (model.json has no data_info.tokenizer_json; "
                                 f"set {task}.preprocess.tokenizer_dir)")
            self.tokenizer = TextTokenizer.load(tok_dir)
        max_len = getattr(arch, "max_sequence_length", None)
        self.caption_tokens = int(di.get("caption_tokens") or pp.caption_tokens or max_len or 24)
        self.seq_len = int(di.get("seq_len") or max_len or 64)

    def decode(self, data: bytes) -> np.ndarray:
        """Video bytes -> uint8 (T, H, W, 3), exactly as the evaluation pipeline decodes (uniform sampling)."""
        from heygen_ray.data.decode import DecodeError, decode_clip

        try:
            clip, _ = decode_clip(data, self.clip_frames, self.height, self.width, sampling="uniform",
                                  short_clips="pad", resize=self.resize)
        except DecodeError as err:
            raise BadInputError("video", f"cannot decode the video: {err}") from None
        return clip

    def captions(self, texts: List[str]):
        import torch

        from heygen_ray.data.text import encode_captions

        ids, mask = encode_captions(self.tokenizer, texts, self.caption_tokens)
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)


def _video(clips: List[np.ndarray]):
    import torch

    from heygen_ray.data.transforms import video_to_float

    return video_to_float(torch.from_numpy(np.stack(clips)))


def classify_forward(runnable: Any, clips: List[np.ndarray]) -> np.ndarray:
    """uint8 clips -> class probabilities (B, K)."""
    import torch

    with torch.inference_mode():
        return torch.softmax(runnable(video=_video(clips)).float(), dim=-1).numpy()


def generate_forward(runnable: Any, prep: Prep, prompts: List[str]) -> List[np.ndarray]:
    """prompts -> uint8 clips (T, H, W, 3)."""
    import torch

    from heygen_ray.data.media import to_uint8

    ids, mask = prep.captions(prompts)
    with torch.inference_mode():
        video = runnable(input_ids=ids, attention_mask=mask).float().numpy()
    return [to_uint8(v) for v in video]


def match_forward(runnable: Any, prep: Prep, clips: List[np.ndarray], captions: List[List[str]]) -> List[List[Dict[str, float]]]:
    """Each clip against its captions -> per caption the match probability (the fused match head)
    and the scaled cosine similarity of the two embeddings."""
    import torch

    video = _video(clips)
    index = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
    ids, mask = prep.captions([c for cs in captions for c in cs])
    with torch.inference_mode():
        scores = runnable(video=video[index], input_ids=ids, attention_mask=mask).float()  # (N, 2)
    prob, sim = torch.sigmoid(scores[:, 0]).tolist(), scores[:, 1].tolist()
    out, k = [], 0
    for cs in captions:
        out.append([{"caption": c, "match_probability": prob[k + j], "similarity": sim[k + j]} for j, c in enumerate(cs)])
        k += len(cs)
    return out


def complete_forward(runnable: Any, prep: Prep, prompts: List[List[int]], max_tokens: List[int],
                     temperatures: List[float], seeds: List[Optional[int]]) -> List[List[int]]:
    """Batched sampling from a causal LM: prompts left-padded with an attention mask (padding is
    no key), each row with its own length, temperature (0: greedy) and seed; stops at <eos>."""
    import torch

    tok = prep.tokenizer
    gens = [torch.Generator().manual_seed(int(s)) if s is not None else None for s in seeds]
    seqs = [list(p) for p in prompts]
    out: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.inference_mode():
        for _ in range(max(max_tokens)):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            ctx = [seqs[i][-prep.seq_len:] for i in active]
            width = max(len(c) for c in ctx)
            ids = torch.full((len(active), width), tok.pad_id, dtype=torch.int64)
            mask = torch.zeros((len(active), width), dtype=torch.bool)
            for j, c in enumerate(ctx):
                ids[j, width - len(c):] = torch.tensor(c)
                mask[j, width - len(c):] = True
            logits = runnable(input_ids=ids, attention_mask=mask)[:, -1].float()  # (B, V)
            for j, i in enumerate(active):
                t = temperatures[i]
                if t < 1e-3:  # (near) zero: greedy, and no overflow in logits / t
                    nxt = int(logits[j].argmax())
                else:
                    probs = torch.softmax(logits[j] / t, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gens[i]))
                if nxt == tok.eos_id:
                    done[i] = True
                    continue
                seqs[i].append(nxt)
                out[i].append(nxt)
                if len(out[i]) >= max_tokens[i]:
                    done[i] = True
    return out


