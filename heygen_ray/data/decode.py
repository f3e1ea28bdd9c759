"""Clip decoding with PyAV: a video -> T sampled frames, resized, uint8 (T, H, W, 3).

The video is bytes (a request body), a local path or a seekable file object (a pyarrow input file):
paths and files are read as streams, so a decoder's memory does not grow with the file's length. A
time window (``start_s``, ``end_s``) seeks to the keyframe before it and stops decoding after it.
Pure functions (no Ray): the Ray Data pipeline, the Serve app and the benchmarks call the same code.
"""

from __future__ import annotations

import io
import math
from typing import Any, Dict, Optional, Tuple, Union

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


Source = Union[bytes, str, Any]  # bytes, a local path, or a seekable binary file object


def _open(source: Source):
    import av

    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise DecodeError("empty file")
        return av.open(io.BytesIO(source), mode="r")
    if hasattr(source, "seek"):
        source.seek(0)  # a file object read before (a retry after a truncated read) starts over
    return av.open(source, mode="r")


def window_bounds(container, stream, start_s: float, end_s: Optional[float]) -> Tuple[float, float]:
    """(start, end) in seconds of a window inside the video: the end is cut at the video's end; a
    window that starts past the end, or is empty, is a :class:`DecodeError` (reason ``window``)."""
    duration = None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1e6
    if duration is not None:
        if start_s >= duration:
            raise DecodeError(f"window: starts at {start_s:.2f} s, past the end of the video ({duration:.2f} s)")
        end_s = duration if end_s is None else min(end_s, duration)
    elif end_s is None:
        raise DecodeError("window: the video reports no duration, so the window needs an end")
    if end_s <= start_s:
        raise DecodeError(f"window: empty ({start_s:.2f} s to {end_s:.2f} s)")
    return start_s, end_s


def video_duration(source: Source) -> float:
    """Seconds of the first video stream (from the container's header: no decoding)."""
    import av

    try:
        with _open(source) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            return window_bounds(container, container.streams.video[0], 0.0, None)[1]
    except DecodeError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as err:
        raise DecodeError(f"{type(err).__name__}: {err}") from None


def _decode_window(container, stream, start_s: float, end_s: Optional[float], clip_frames: int, height: int,
                   width: int, sampling: str, short_clips: str, resize: str,
                   rng: Optional[np.random.Generator]) -> Tuple[np.ndarray, int]:
    """The clip of a time window: the window's frames (at the stream's rate) are sampled like a whole
    video's (TSN segments); decoding starts at the keyframe before the window and stops after the
    last sampled frame."""
    start_s, end_s = window_bounds(container, stream, start_s, end_s)
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    if fps <= 0:
        raise DecodeError("window: the video reports no frame rate")
    n = max(1, int(round((end_s - start_s) * fps)))
    if n < clip_frames and short_clips == "drop":
        raise DecodeError(f"window: {n} frames < clip_frames={clip_frames} (short_clips='drop')")
    idx = sample_indices(n, clip_frames, sampling, rng)
    wanted, last = {int(i) for i in idx}, int(idx.max())
    container.seek(int(start_s / stream.time_base), stream=stream, backward=True, any_frame=False)
    got: Dict[int, np.ndarray] = {}
    for frame in container.decode(stream):
        if frame.time is None:
            continue
        j = int(round((frame.time - start_s) * fps))  # the frame's index inside the window
        if j in wanted and j not in got:
            got[j] = _to_array(frame, height, width, resize)
        if j >= last or frame.time >= end_s:
            break
    if not got:
        raise DecodeError(f"window: no frame decodable between {start_s:.2f} s and {end_s:.2f} s")
    have = sorted(got)
    # a wanted frame the stream skipped (timestamps off the nominal rate): the nearest decoded one
    frames = [got[i] if i in got else got[min(have, key=lambda h: abs(h - i))] for i in idx.tolist()]
    return np.stack(frames), n


def decode_clip(
    data: Source,
    clip_frames: int,
    height: int,
    width: int,
    *,
    sampling: str = "uniform",
    short_clips: str = "pad",
    resize: str = "squash",
    threads: int = 1,
    rng: Optional[np.random.Generator] = None,
    start_s: Optional[float] = None,
    end_s: Optional[float] = None,
    _num_frames: Optional[int] = None,
) -> Tuple[np.ndarray, int]:
    """Decode ``clip_frames`` sampled frames of the first video stream in ``data`` (bytes, a local
    path or a seekable file object), of the whole video or of the window [``start_s``, ``end_s``).

    Returns (uint8 array (T, H, W, 3), number of frames in the source or the window). Raises
    :class:`DecodeError` for anything that is not a decodable video, a window outside it, or fewer than
    T frames when ``short_clips='drop'``. Only the sampled frames are converted to RGB, and decoding
    stops after the last one.
    """
    import av

    try:
        with _open(data) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            if threads != 1:
                stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            if start_s is not None or end_s is not None:
                return _decode_window(container, stream, start_s or 0.0, end_s, clip_frames, height, width,
                                      sampling, short_clips, resize, rng)
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
