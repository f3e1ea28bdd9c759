"""Clip decoding with PyAV: bytes -> T sampled frames, resized, uint8 (T, H, W, 3).

Pure functions (no Ray): the Ray Data pipeline, the Serve app and the benchmarks call the same code.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Tuple

import numpy as np


class DecodeError(ValueError):
    """A file that is missing, truncated, not a video, or too short (with short_clips='drop')."""


def sample_indices(num_frames: int, clip_frames: int, mode: str, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Frame indices for a clip of ``clip_frames`` out of ``num_frames`` (TSN-style segments).

    The video is cut into ``clip_frames`` equal segments; ``uniform`` takes each segment's centre frame
    (deterministic, for evaluation), ``random`` a random frame inside each segment (training). Both
    cover the whole video at the same temporal scale. A video shorter than ``clip_frames`` gives all
    its frames followed by repeats of the last one (the caller decides whether to keep that).
    """
    if num_frames <= 0:
        raise ValueError("num_frames must be positive")
    if num_frames < clip_frames:
        return np.concatenate([np.arange(num_frames), np.full(clip_frames - num_frames, num_frames - 1)]).astype(np.int64)
    seg = num_frames / clip_frames
    starts = seg * np.arange(clip_frames)
    if mode == "uniform":
        pos = starts + seg / 2.0
    elif mode == "random":
        rng = rng if rng is not None else np.random.default_rng()
        pos = starts + rng.uniform(0.0, seg, size=clip_frames)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; expected 'uniform' or 'random'")
    return np.minimum(np.floor(pos).astype(np.int64), num_frames - 1)


def _count_frames(container, stream) -> int:
    """Frames in the stream: the container's count, else the number of demuxed packets."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    container.seek(0)
    return n


def _to_array(frame, height: int, width: int, resize: str) -> np.ndarray:
    if resize == "squash" or (frame.height * width == frame.width * height):
        return frame.to_ndarray(format="rgb24", width=width, height=height)
    # center_crop: scale the shorter side to fit, then crop the centre.
    scale = max(height / frame.height, width / frame.width)
    h, w = max(height, math.ceil(frame.height * scale)), max(width, math.ceil(frame.width * scale))
    img = frame.to_ndarray(format="rgb24", width=w, height=h)
    top, left = (h - height) // 2, (w - width) // 2
    return img[top : top + height, left : left + width]


def decode_clip(
    data: bytes,
    clip_frames: int,
    height: int,
    width: int,
    *,
    sampling: str = "uniform",
    short_clips: str = "pad",
    resize: str = "squash",
    threads: int = 1,
    rng: Optional[np.random.Generator] = None,
    _num_frames: Optional[int] = None,
) -> Tuple[np.ndarray, int]:
    """Decode ``clip_frames`` sampled frames of the first video stream in ``data``.

    Returns (uint8 array (T, H, W, 3), number of frames in the source). Raises :class:`DecodeError`
    for anything that is not a decodable video, or that is shorter than T when ``short_clips='drop'``.
    Only the sampled frames are converted to RGB, and decoding stops after the last one.
    """
    import av

    if not data:
        raise DecodeError("empty file")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            if threads != 1:
                stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            n = _num_frames if _num_frames is not None else _count_frames(container, stream)
            if n <= 0:
                raise DecodeError("video stream has no frames")
            if n < clip_frames and short_clips == "drop":
                raise DecodeError(f"{n} frames < clip_frames={clip_frames} (short_clips='drop')")
            idx = sample_indices(n, clip_frames, sampling, rng)
            wanted = {int(i) for i in idx}
            last = int(idx.max())
            got = {}
            seen = 0
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if i in wanted:
                    got[i] = _to_array(frame, height, width, resize)
                if i >= last:
                    break
    except DecodeError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as err:
        raise DecodeError(f"{type(err).__name__}: {err}") from None
    if not got:
        raise DecodeError("no frame could be decoded")
    if len(got) < len(wanted):
        # The container over-reported its length (truncated file, or bad metadata): resample over the
        # frames that really decoded.
        if seen < clip_frames and short_clips == "drop":
            raise DecodeError(f"only {seen} frames decodable < clip_frames={clip_frames} (short_clips='drop')")
        return decode_clip(
            data, clip_frames, height, width, sampling=sampling, short_clips=short_clips,
            resize=resize, threads=threads, rng=rng, _num_frames=seen,
        )
    return np.stack([got[int(i)] for i in idx]), n
