"""The embedded data set: captioned clips of moving shapes, encoded as real H.264 mp4 with PyAV.

Every clip is a pure function of (seed, index), so the set is deterministic for a seed whatever the
number of Ray tasks. The class label is shape x direction ("circle_left"); colour, speed, size, the
background, noise and distractors vary as nuisances. Layout under ``output_dir``::

    manifest.parquet     one row per clip (see MANIFEST_COLUMNS); paths relative to this folder
    labels.json          label names, in label-index order
    corpus.jsonl         {"text": ...} per line: every caption plus longer scene descriptions
    videos/<split>/clip_000123.mp4
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from heygen_ray import fsutil
from heygen_ray.config import COLORS, SPEEDS, SynthSpec
from heygen_ray.data.media import encode_mp4  # noqa: F401  (also re-exported here)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path", "caption", "label", "label_name", "split", "frames", "fps", "width", "height", "size_bytes", "sha256",
]


@dataclass(frozen=True)
class ClipParams:
    index: int
    shape: str
    direction: str
    color: str
    speed: str
    label: int
    radius: float
    start: tuple  # (x, y) in pixels
    end: tuple
    background: int
    distractors: tuple  # ((shape, x, y, radius, grey), ...)
    noise_std: float
    frame: tuple = (64, 64)  # (width, height) that start / end refer to

    @property
    def tone(self) -> str:
        return tone(self.background)

    @property
    def caption(self) -> str:
        """What a person would say about the clip: the object, its motion, where it starts, and the
        background's brightness (without the last two a caption leaves most of the pixels open, and
        no text-to-video model can beat the mean clip by much: measured ceiling 19.5 dB vs 22.6 dB)."""
        return (f"a {self.color} {self.shape} moves {self.direction} {self.speed} "
                f"from the {region(*self.start, *self.frame)} on a {self.tone} background")


TONES = ("black", "very dark", "dark", "dim", "grey")  # background grey level 10-19, 20-29, ..., 50-59


def tone(background: int) -> str:
    """The background's brightness in words (five levels over the generated range 10..59)."""
    return TONES[min(max((int(background) - 10) // 10, 0), len(TONES) - 1)]


def region(x: float, y: float, width: float, height: float) -> str:
    """Where (x, y) is in a width x height frame, on a 3 x 3 grid ("top left", "centre", ...)."""
    v = "top" if y < height / 3 else ("bottom" if y > 2 * height / 3 else "middle")
    h = "left" if x < width / 3 else ("right" if x > 2 * width / 3 else "centre")
    return "centre" if (v, h) == ("middle", "centre") else f"{v} {h}"


def assign_splits(spec: SynthSpec) -> List[str]:
    """Deterministic, stratified split per clip index.

    Clips are ordered round-robin over labels (each label's clips in a seeded random order), then the
    first round(N*val) go to val, the next round(N*test) to test, the rest to train, so every split
    sees the labels as evenly as N allows.
    """
    n_labels = len(spec.label_names)
    rng = np.random.default_rng([spec.seed, 7919])
    groups = [np.arange(label, spec.num_clips, n_labels) for label in range(n_labels)]
    groups = [g[rng.permutation(len(g))] for g in groups]
    label_order = rng.permutation(n_labels)
    order = [int(groups[l][r]) for r in range(max(len(g) for g in groups)) for l in label_order if r < len(groups[l])]
    n_val = int(round(spec.num_clips * spec.split.val))
    n_test = min(int(round(spec.num_clips * spec.split.test)), spec.num_clips - n_val)
    splits = ["train"] * spec.num_clips
    for j, i in enumerate(order):
        if j < n_val:
            splits[i] = "val"
        elif j < n_val + n_test:
            splits[i] = "test"
    return splits


def clip_params(spec: SynthSpec, index: int) -> ClipParams:
    """Everything about clip ``index`` (a pure function of seed and index)."""
    rng = np.random.default_rng([spec.seed, index])
    label = index % len(spec.label_names)
    shape = spec.shapes[label // len(spec.directions)]
    direction = spec.directions[label % len(spec.directions)]
    color = spec.colors[int(rng.integers(len(spec.colors)))]
    speed = spec.speeds[int(rng.integers(len(spec.speeds)))]
    H, W = spec.height, spec.width
    radius = float(min(H, W) * rng.uniform(0.11, 0.16))
    # Travel distance over the clip: a fraction of the frame along the motion axis.
    axis_len = W if direction in ("left", "right") else H
    travel = SPEEDS[speed] * 0.4 * axis_len
    margin = radius + 1.0
    lo, hi = margin, axis_len - margin - travel
    a0 = float(rng.uniform(lo, max(lo, hi)))
    other_len = H if direction in ("left", "right") else W
    b = float(rng.uniform(margin, other_len - margin))
    if direction == "right":
        start, end = (a0, b), (a0 + travel, b)
    elif direction == "left":
        start, end = (W - a0, b), (W - a0 - travel, b)
    elif direction == "down":
        start, end = (b, a0), (b, a0 + travel)
    else:  # up
        start, end = (b, H - a0), (b, H - a0 - travel)
    n_distract = int(rng.integers(0, spec.max_distractors + 1))
    distractors = tuple(
        (
            str(rng.choice(list(spec.shapes))),
            float(rng.uniform(0, W)),
            float(rng.uniform(0, H)),
            float(radius * rng.uniform(0.4, 0.7)),
            int(rng.integers(110, 160)),
        )
        for _ in range(n_distract)
    )
    return ClipParams(
        index=index, shape=shape, direction=direction, color=color, speed=speed, label=label,
        radius=radius, start=start, end=end, background=int(rng.integers(10, 60)),
        distractors=distractors, noise_std=spec.noise_std, frame=(W, H),
    )


def shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (H, W) mask of ``shape`` centred at (cx, cy) with radius r."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up
        t = (dy + r) / (1.8 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if shape == "cross":
        w = r / 3.0
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(p: ClipParams, frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Render clip ``p`` as uint8 (T, H, W, 3)."""
    rng = np.random.default_rng([seed, p.index, 1])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    base = np.full((height, width, 3), p.background, dtype=np.float32)
    for shape, x, y, r, grey in p.distractors:
        base[shape_mask(shape, xx, yy, x, y, r)] = grey
    color = np.asarray(COLORS[p.color], dtype=np.float32)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        cx = p.start[0] + a * (p.end[0] - p.start[0])
        cy = p.start[1] + a * (p.end[1] - p.start[1])
        img = base.copy()
        img[shape_mask(p.shape, xx, yy, cx, cy, p.radius)] = color
        if p.noise_std > 0:
            img += rng.normal(0.0, p.noise_std * 255.0, size=img.shape).astype(np.float32)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def describe(p: ClipParams, variant: int, width: int, height: int) -> str:
    """A longer scene description for the text corpus (templated, several phrasings)."""

    def where(x: float, y: float) -> str:
        return region(x, y, width, height)

    n = len(p.distractors)
    extra = (
        "nothing else is in the frame." if n == 0
        else f"{'a grey shape stays' if n == 1 else f'{n} grey shapes stay'} still in the background."
    )
    tone = p.tone
    templates = [
        f"the clip shows a {p.color} {p.shape} on a {tone} background. it starts near the "
        f"{where(*p.start)} and moves {p.direction} {p.speed}, ending near the {where(*p.end)}. {extra}",
        f"a {p.shape}, coloured {p.color}, travels {p.direction} {p.speed} from the {where(*p.start)} "
        f"to the {where(*p.end)} of the frame. {extra}",
        f"in this video the {p.color} {p.shape} moves {p.direction}. it moves {p.speed}. {extra} "
        f"the background is {tone} and noisy.",
        f"watch the {p.shape}: it is {p.color} and it goes {p.direction} {p.speed}, from {where(*p.start)} "
        f"to {where(*p.end)}.",
    ]
    return templates[variant % len(templates)]


def _generate_chunk(spec_dict: Dict[str, Any], indices: Sequence[int], splits: Sequence[str], root: str) -> List[Dict[str, Any]]:
    """Render, encode and write a list of clips; returns their manifest rows (runs in a Ray task)."""
    spec = SynthSpec.from_dict(spec_dict)
    rows = []
    for index, split in zip(indices, splits):
        p = clip_params(spec, index)
        frames = render_clip(p, spec.frames, spec.height, spec.width, spec.seed)
        data = encode_mp4(frames, spec.fps, spec.crf, preset=spec.x264_preset)
        rel = f"videos/{split}/clip_{index:06d}.mp4"
        fsutil.write_bytes(fsutil.join(root, rel), data)
        rows.append(
            dict(
                path=rel, caption=p.caption, label=p.label, label_name=spec.label_names[p.label], split=split,
                frames=spec.frames, fps=spec.fps, width=spec.width, height=spec.height,
                size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    return rows


@dataclass
class SynthResult:
    output_dir: str
    manifest: str
    corpus: str
    labels: str
    num_clips: int
    num_documents: int
    total_bytes: int
    seconds: float
    split_counts: Dict[str, int]

    @property
    def clips_per_second(self) -> float:
        return self.num_clips / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["clips_per_second"] = round(self.clips_per_second, 2)
        return d


def generate_dataset(
    spec: SynthSpec,
    *,
    use_ray: bool = True,
    on_progress: Optional[Callable[[int, int], None]] = None,
) -> SynthResult:
    """Generate the embedded set under ``spec.output_dir`` (local path or URI).

    With ``use_ray`` the clips are rendered and encoded by Ray tasks (``clips_per_task`` each), so a
    large set uses the whole cluster; ``output_dir`` must then be reachable from every node. Without it
    everything runs in this process (same bytes: each clip depends only on seed and index).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    root = fsutil.absolute(spec.output_dir)
    fsutil.makedirs(root)
    splits = assign_splits(spec)
    chunks = [list(range(i, min(i + spec.clips_per_task, spec.num_clips))) for i in range(0, spec.num_clips, spec.clips_per_task)]
    rows: List[Dict[str, Any]] = []
    spec_dict = spec.to_dict()
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(_generate_chunk)
        pending = {task.remote(spec_dict, c, [splits[i] for i in c], root): len(c) for c in chunks}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            rows.extend(ray.get(ready[0]))
            done += pending.pop(ready[0])
            if on_progress:
                on_progress(done, spec.num_clips)
    else:
        for c in chunks:
            rows.extend(_generate_chunk(spec_dict, c, [splits[i] for i in c], root))
            if on_progress:
                on_progress(len(rows), spec.num_clips)
    rows.sort(key=lambda r: int(r["path"].rsplit("_", 1)[-1].split(".")[0]))  # by clip index, whatever order tasks finished

    table = pa.Table.from_pylist(rows).select(MANIFEST_COLUMNS)
    table = table.replace_schema_metadata({"heygen_ray.label_names": json.dumps(spec.label_names),
                                           "heygen_ray.synth_spec": json.dumps(spec_dict)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    manifest = fsutil.join(root, "manifest.parquet")
    fsutil.write_bytes(manifest, sink.getvalue().to_pybytes())
    labels = fsutil.join(root, "labels.json")
    fsutil.write_bytes(labels, json.dumps({"label_names": spec.label_names}, indent=1).encode())

    docs: List[str] = []
    for i in range(spec.num_clips):
        p = clip_params(spec, i)
        docs.append(p.caption)
        for v in range(spec.descriptions_per_clip):
            docs.append(describe(p, i + v, spec.width, spec.height))
    corpus = fsutil.join(root, "corpus.jsonl")
    fsutil.write_bytes(corpus, "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())

    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    return SynthResult(
        output_dir=root, manifest=manifest, corpus=corpus, labels=labels, num_clips=len(rows),
        num_documents=len(docs), total_bytes=int(sum(r["size_bytes"] for r in rows)),
        seconds=time.perf_counter() - t0, split_counts=counts,
    )
