"""Video files for people to look at: H.264 mp4 (PyAV), animated GIF and PNG stills (Pillow), plus
the side-by-side grid used for generated-vs-real samples and a strip of its frames. Pure numpy in, bytes out."""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18, threads: int = 1, preset: str = "medium",
               gop: Optional[int] = None) -> bytes:
    """uint8 (T, H, W, 3) -> H.264 (libx264, yuv420p) mp4 bytes. Deterministic for the same input.
    H and W must be even (yuv420p). ``gop``: a keyframe every this many frames (default: libx264's)."""
    import av

    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"mp4 (yuv420p) needs even frame sizes, got {H}x{W}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.thread_count = threads
        if gop is not None:
            stream.codec_context.gop_size = gop
        # mbtree=0: with macroblock-tree rate control this libx264 build gave different bytes for the
        # same frames from one run to the next (measured); without it the output is bit-exact.
        stream.options = {"crf": str(crf), "preset": preset, "tune": "animation", "x264-params": "mbtree=0"}
        for t in range(T):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[t]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_gif(frames: np.ndarray, fps: int) -> bytes:
    """uint8 (T, H, W, 3) -> an animated GIF that loops forever (plays inline in the MLflow UI)."""
    from PIL import Image

    images = [Image.fromarray(np.ascontiguousarray(f), mode="RGB") for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0, optimize=False)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def frame_strip(frames: np.ndarray, every: int = 2, gap: int = 6) -> np.ndarray:
    """uint8 (T, H, W, 3) -> one image of frames 0, every, 2*every, ... left to right with ``gap``
    white columns between them: a still picture of a clip (for a README or a report)."""
    if frames.ndim != 4 or every < 1:
        raise ValueError(f"frame_strip needs (T, H, W, 3) frames and every >= 1, got {frames.shape}, {every}")
    picked = list(frames[::every])
    spacer = np.full((frames.shape[1], gap, frames.shape[3]), 255, dtype=np.uint8)
    parts = [p for f in picked for p in (f, spacer)][:-1]
    return np.concatenate(parts, axis=1)


def to_uint8(video: np.ndarray) -> np.ndarray:
    """float (C, T, H, W) in [-1, 1] -> uint8 (T, H, W, C)."""
    v = (np.clip(np.asarray(video, dtype=np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.rint(v).astype(np.uint8).transpose(1, 2, 3, 0)


def side_by_side(rows: Sequence[Sequence[np.ndarray]], scale: int = 4, gap: int = 2) -> np.ndarray:
    """A grid video from rows of clips: ``rows[i][j]`` is uint8 (T, H, W, 3), all the same shape
    (e.g. each row = [generated, real] for one caption). Each cell is upscaled ``scale`` x (nearest:
    32-pixel clips are too small to judge), with ``gap`` white pixels between cells. -> (T, H', W', 3)
    with even H' and W' (mp4-ready)."""
    if not rows or not rows[0]:
        raise ValueError("side_by_side needs at least one clip")
    T, H, W, C = rows[0][0].shape
    h, w = H * scale, W * scale
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    out_h, out_w = n_rows * h + (n_rows + 1) * gap, n_cols * w + (n_cols + 1) * gap
    out = np.full((T, out_h + out_h % 2, out_w + out_w % 2, C), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, clip in enumerate(row):
            if clip.shape != (T, H, W, C):
                raise ValueError(f"clip [{i}][{j}] has shape {clip.shape}, expected {(T, H, W, C)}")
            big = clip.repeat(scale, axis=1).repeat(scale, axis=2)
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            out[:, y:y + h, x:x + w] = big
    return out
