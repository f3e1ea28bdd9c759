"""The Ray Data video pipeline: manifest -> PyAV decode (one row per clip; a row's time window, or
``clips_per_video`` windows of it, for long videos) -> uint8 (T, H, W, 3).

The manifest (parquet, CSV or JSONL; a local path or any pyarrow URI) is read in the driver, checked,
and turned into a dataset of rows; :class:`ClipDecoder` decodes each file with the pure functions in
:mod:`heygen_ray.data.decode`, in plain Ray tasks for a small dataset (:func:`decode_batch`) and in a
pool of actors for a large one (``video.task_decode_max_rows``). Bad files (missing, truncated, not a video,
too short with ``short_clips='drop'``) are dropped and counted by the cluster's one stats actor
(:class:`DecodeStats`); if every file of the pipeline is bad, decoding fails with an error that says so.
Normalisation to float happens on the training worker (:func:`heygen_ray.data.transforms.video_to_float`),
so the object store carries uint8.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from heygen_ray import fsutil
from heygen_ray.config import ConfigError, VideoDataSpec
from heygen_ray.data.decode import DecodeError, decode_clip

log = logging.getLogger(__name__)

MAX_REPORTED_PATHS = 5
# The stats actor: one per cluster, shared by every dataset (see DecodeStats). Versioned, so that a
# long-lived cluster still running an older one gets a new one rather than a mismatched API.
STATS_ACTOR = "decode_stats.v2"
STATS_NAMESPACE = "heygen_ray"
MAX_TRACKED_DATASETS = 256


class AllVideosFailedError(RuntimeError):
    """Every file in the pipeline failed to decode: almost surely a wrong path or root, not bad luck."""


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def read_manifest(uri: str, spec: VideoDataSpec) -> "pyarrow.Table":  # noqa: F821
    """Read and check a manifest; returns columns path (absolute URI), label, caption, split, row_id.

    Relative paths in the manifest are resolved against the manifest's folder, so a data set folder
    can be moved or copied to object storage as a whole.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    if not fsutil.exists(uri):
        raise ConfigError(f"video.manifest: file not found: {uri}")
    fs, path = fsutil.filesystem(uri)
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".parquet", ".pq"):
            table = pq.read_table(path, filesystem=fs)
        elif ext == ".csv":
            with fs.open_input_stream(path) as f:
                table = pacsv.read_csv(f)
        elif ext in (".jsonl", ".json", ".ndjson"):
            with fs.open_input_stream(path) as f:
                table = pajson.read_json(f)
        else:
            raise ConfigError(f"video.manifest: {uri}: unsupported extension {ext!r} (use .parquet, .csv or .jsonl)")
    except (pa.ArrowInvalid, OSError) as err:
        raise ConfigError(f"video.manifest: {uri}: cannot read: {err}") from None

    cols = spec.columns
    present = table.column_names
    wanted = {"path": cols.path, "label": cols.label, "caption": cols.caption, "split": cols.split,
              "start": cols.start, "end": cols.end}
    if cols.path not in present:
        raise ConfigError(f"video.manifest: {uri}: no column {cols.path!r} (video.columns.path); columns: {present}")
    out: Dict[str, Any] = {}
    base = fsutil.parent(uri)
    out["path"] = pa.array([fsutil.join(base, str(p)) for p in table.column(cols.path).to_pylist()], pa.string())
    for key in ("label", "caption", "split", "start", "end"):
        name = wanted[key]
        if name is None or name not in present:
            continue
        col = table.column(name)
        if key in ("start", "end"):
            out[key] = _window_column(uri, name, key, col, out)
        elif key == "label":
            if not pa.types.is_integer(col.type):
                raise ConfigError(f"video.manifest: {uri}: column {name!r} (video.columns.label) must hold integers, got {col.type}")
            out["label"] = col.cast(pa.int64())
        else:
            out[key] = col.cast(pa.string())
    out["row_id"] = pa.array(np.arange(table.num_rows, dtype=np.int64))
    result = pa.table(out)
    return result.replace_schema_metadata(table.schema.metadata)


def _window_column(uri: str, name: str, key: str, col: Any, out: Dict[str, Any]) -> Any:
    """A window bound column as float64 seconds (null: no bound); a negative start, or an end not
    after its start, fails naming the row."""
    import pyarrow as pa

    try:
        values = col.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ConfigError(f"video.manifest: {uri}: column {name!r} (video.columns.{key}) must hold seconds, got {col.type}") from None
    v = values.to_numpy(zero_copy_only=False)
    if key == "start":
        bad = np.flatnonzero(v < 0)
        if bad.size:
            raise ConfigError(f"video.manifest: {uri}: row {int(bad[0])} ({out['path'][int(bad[0])]}): "
                              f"{name} = {v[bad[0]]} s is negative")
    elif "start" in out:
        start = out["start"].to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(v <= np.nan_to_num(start, nan=0.0))
        if bad.size:
            i = int(bad[0])
            raise ConfigError(f"video.manifest: {uri}: row {i} ({out['path'][i]}): the window ends at {v[i]} s, "
                              f"not after its start {start[i]} s")
    return values


def label_names_for(uri: str, table: "pyarrow.Table") -> Optional[List[str]]:  # noqa: F821
    """Label names from the manifest's metadata or a labels.json beside it (None when unknown)."""
    meta = table.schema.metadata or {}
    if b"heygen_ray.label_names" in meta:
        return json.loads(meta[b"heygen_ray.label_names"])
    side = fsutil.join(fsutil.parent(uri), "labels.json")
    if fsutil.exists(side):
        return json.loads(fsutil.read_bytes(side))["label_names"]
    return None


# --------------------------------------------------------------------------------------------------
# Ray side: the stats actor and the decoder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsKey:
    """One dataset's entry in the stats actor: its key and sizes (enough to recreate the entry)."""

    key: str
    manifest_rows: int  # row ids index the manifest
    num_rows: int  # rows in this dataset (one split of the manifest)


class DecodeStats:
    """Ray actor, one per cluster: for each dataset, which rows decoded and which were dropped (unique
    by row id, so re-reading an epoch does not double count).

    One shared, detached actor rather than one per dataset: an actor is a process of its own (about
    1.5 CPU-seconds to start on 2 cores), and every training run builds two or more datasets. A
    pipeline releases its datasets' entries when it is garbage collected; beyond
    ``max_datasets`` the least recently used are forgotten (a report recreates its entry)."""

    def __init__(self, max_datasets: int = MAX_TRACKED_DATASETS) -> None:
        self.max_datasets = max_datasets
        self.datasets: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()

    def _entry(self, ref: StatsKey) -> Dict[str, Any]:
        entry = self.datasets.get(ref.key)
        if entry is None:
            entry = self.datasets[ref.key] = {"state": np.zeros(ref.manifest_rows, dtype=np.int8),  # 0 unseen, 1 ok, 2 dropped
                                              "examples": [], "reasons": {}}
            while len(self.datasets) > self.max_datasets:
                self.datasets.popitem(last=False)
        self.datasets.move_to_end(ref.key)
        return entry

    def report(self, ref: StatsKey, ok_ids: List[int], bad: List[Dict[str, Any]]) -> bool:
        """Record a batch; returns True when every row of the dataset has been dropped."""
        e = self._entry(ref)
        state = e["state"]
        state[np.asarray(ok_ids, dtype=np.int64)] = 1
        for b in bad:
            if state[b["row_id"]] != 2:
                state[b["row_id"]] = 2
                kind = b["reason"].split(":", 1)[0]
                e["reasons"][kind] = e["reasons"].get(kind, 0) + 1
                if len(e["examples"]) < MAX_REPORTED_PATHS:
                    e["examples"].append({"path": b["path"], "reason": b["reason"]})
        return int((state == 2).sum()) == ref.num_rows

    def summary(self, ref: StatsKey) -> Dict[str, Any]:
        e = self._entry(ref)
        return {
            "rows": ref.num_rows,
            "decoded": int((e["state"] == 1).sum()),
            "dropped": int((e["state"] == 2).sum()),
            "dropped_examples": list(e["examples"]),
            "dropped_reasons": dict(e["reasons"]),
        }

    def release(self, keys: List[str]) -> None:
        for key in keys:
            self.datasets.pop(key, None)

    def keys(self) -> List[str]:
        return list(self.datasets)


@dataclass(frozen=True)
class StatsRef:
    """What a decoder holds: the stats actor and its dataset's key."""

    actor: Any
    key: StatsKey

    def report(self, ok_ids: List[int], bad: List[Dict[str, Any]]) -> bool:
        import ray

        # awaited: when the last batch reaches the consumer, the stats hold every batch before it
        return bool(ray.get(self.actor.report.remote(self.key, ok_ids, bad)))

    def summary(self) -> Dict[str, Any]:
        import ray

        return ray.get(self.actor.summary.remote(self.key))


@functools.lru_cache(maxsize=None)
def _stats_actor_class() -> Any:
    """`DecodeStats` as a Ray actor class, made once per process (not once per dataset)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(DecodeStats)


def stats_actor() -> Any:
    """The cluster's `DecodeStats` actor (created by the first caller; restarted, empty, if its node is lost)."""
    return _stats_actor_class().options(name=STATS_ACTOR, namespace=STATS_NAMESPACE, lifetime="detached",
                                        get_if_exists=True).remote()


def _release_stats(actor: Any, keys: List[str]) -> None:
    """A pipeline's finaliser: drop its datasets' entries (best effort: Ray may already be shut down)."""
    try:
        import ray

        if keys and ray.is_initialized():
            actor.release.remote(list(keys))
    except Exception:  # noqa: BLE001 (at interpreter exit anything may be gone)
        pass


class ClipDecoder:
    """Opens each file of a batch as a stream (never read whole) and decodes it with PyAV: one clip per
    row, or one per window when rows carry windows or ``clips_per_video`` > 1; reports the batch's
    decoded and dropped rows to the cluster's `DecodeStats` actor (``stats``: a `StatsRef`).

    One instance per actor, or per worker process and settings (:func:`decode_batch`): the filesystem
    handles are made once, not once per batch.
    """

    def __init__(self, spec: Dict[str, Any], sampling: str, stats: Any, manifest: str,
                 columns: Optional[Sequence[str]] = None) -> None:
        self.spec = VideoDataSpec.from_dict(spec)  # re-validated on arrival
        self.sampling = sampling
        self.columns = list(columns) if columns is not None else None
        self.stats = stats
        self.manifest = manifest
        self.rng = np.random.default_rng([self.spec.seed, os.getpid()])

    @staticmethod
    def _open(uri: str) -> Any:
        """The file as a stream: a local path (PyAV reads it in small buffers), or a seekable pyarrow
        input file for any other filesystem (ranged reads): never the whole file in memory."""
        fs, path = fsutil.filesystem(uri)
        try:
            if fsutil.has_scheme(uri):
                return fs.open_input_file(path)
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            return path
        except FileNotFoundError:
            raise DecodeError("missing: file not found") from None
        except OSError as err:
            raise DecodeError(f"unreadable: {err}") from None

    def _windows(self, source: Any, batch: Dict[str, np.ndarray], i: int) -> List[Any]:
        """The (start, end) seconds of the clips of row ``i``: its window (or the whole video) cut into
        ``clips_per_video`` equal parts; [(None, None)] for a whole-video row."""
        from heygen_ray.data.decode import video_duration

        start = float(batch["start"][i]) if "start" in batch and not np.isnan(batch["start"][i]) else None
        end = float(batch["end"][i]) if "end" in batch and not np.isnan(batch["end"][i]) else None
        k = self.spec.clips_per_video
        if k == 1:
            return [(start, end)] if start is not None or end is not None else [(None, None)]
        start = start or 0.0
        total = video_duration(source)
        if start >= total:
            raise DecodeError(f"window: starts at {start:.2f} s, past the end of the video ({total:.2f} s)")
        end = total if end is None else min(end, total)
        step = (end - start) / k
        return [(start + j * step, start + (j + 1) * step) for j in range(k)]

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        s = self.spec
        windowed = "start" in batch or "end" in batch or s.clips_per_video > 1
        keep, clips, source_frames, bounds, ok_ids, bad = [], [], [], [], [], []
        for i, (uri, row_id) in enumerate(zip(batch["path"], batch["row_id"])):
            source = None
            try:
                source = self._open(str(uri))
                decoded = []
                for a, b in self._windows(source, batch, i) if windowed else [(None, None)]:
                    clip, n = decode_clip(
                        source, s.clip_frames, s.height, s.width, sampling=self.sampling, short_clips=s.short_clips,
                        resize=s.resize, threads=s.decode_threads, rng=self.rng, start_s=a, end_s=b)
                    decoded.append((clip, n, a, b))
            except DecodeError as err:
                log.warning("dropping %s: %s", uri, err)
                bad.append({"row_id": int(row_id), "path": str(uri), "reason": str(err)})
                continue
            finally:
                if source is not None and hasattr(source, "close"):
                    source.close()
            for clip, n, a, b in decoded:
                keep.append(i)
                clips.append(clip)
                source_frames.append(n)
                bounds.append((np.nan if a is None else a, np.nan if b is None else b))
            ok_ids.append(int(row_id))
        if self.stats.report(ok_ids, bad):
            summary = self.stats.summary()
            examples = "; ".join(f"{e['path']} ({e['reason']})" for e in summary["dropped_examples"])
            raise AllVideosFailedError(
                f"every one of the {summary['rows']} videos listed in {self.manifest} failed to decode "
                f"(reasons: {summary['dropped_reasons']}); first: {examples}. Check the paths in the "
                "manifest (relative paths are resolved against the manifest's folder)."
            )
        out = {k: v[keep] for k, v in batch.items()}
        out["video"] = (
            np.stack(clips) if clips else np.zeros((0, s.clip_frames, s.height, s.width, 3), dtype=np.uint8)
        )
        out["source_frames"] = np.asarray(source_frames, dtype=np.int64)
        if windowed:  # where each clip was cut: seconds into its video (NaN: from the start / to the end)
            edges = np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
            out["clip_start_s"], out["clip_end_s"] = edges[:, 0], edges[:, 1]
        if self.columns is not None:
            out = {k: out[k] for k in self.columns}
        return out


_DECODERS: Dict[str, ClipDecoder] = {}  # per worker process: settings -> decoder


def decode_batch(batch: Dict[str, np.ndarray], *, spec: Dict[str, Any], sampling: str, stats: Any, manifest: str,
                 columns: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """The ``map_batches`` function of a small dataset: decodes ``batch`` with this process's
    `ClipDecoder` for these settings, reporting to ``stats`` (a `StatsRef`).

    Plain Ray tasks run on Ray's warm worker processes, so decoding starts at once; an actor pool
    first starts a process per decoder (seconds on a small machine, at every execution of the
    dataset), which took longer than decoding a validation split or a small training set. Measured
    on 2 cores, Ray Data ran fewer of these tasks at a time than it ran actors, so large datasets
    still decode in an actor pool."""
    key = json.dumps([spec, sampling, manifest, columns], sort_keys=True, default=str)
    decoder = _DECODERS.get(key)
    if decoder is None:
        decoder = _DECODERS[key] = ClipDecoder(spec, sampling, stats, manifest, columns)
    decoder.stats = stats  # this dataset's (the cached decoder may have served another with the same settings)
    return decoder(batch)


# --------------------------------------------------------------------------------------------------
# The pipeline object
# --------------------------------------------------------------------------------------------------


@dataclass
class VideoPipeline:
    """Builds Ray datasets of decoded clips for the splits of one manifest, and keeps their drop counts."""

    spec: VideoDataSpec
    manifest_uri: str = ""
    table: Any = None
    label_names: Optional[List[str]] = None
    _stats: Dict[str, StatsRef] = field(default_factory=dict)
    _keys: List[str] = field(default_factory=list)  # every dataset this pipeline built (released with it)

    @classmethod
    def from_spec(cls, spec: VideoDataSpec) -> "VideoPipeline":
        if spec.manifest is None:
            raise ConfigError("video.manifest: not set")
        uri = fsutil.absolute(spec.manifest)
        table = read_manifest(uri, spec)
        return cls(spec=spec, manifest_uri=uri, table=table, label_names=label_names_for(uri, table))

    @property
    def num_classes(self) -> Optional[int]:
        if self.label_names is not None:
            return len(self.label_names)
        if "label" in self.table.column_names and self.table.num_rows:
            return int(max(self.table.column("label").to_pylist())) + 1
        return None

    def rows(self, split: Optional[str] = None) -> "pyarrow.Table":  # noqa: F821
        import pyarrow.compute as pc

        if split is None:
            return self.table
        if "split" not in self.table.column_names:
            raise ConfigError(f"video.manifest: {self.manifest_uri} has no split column; cannot select split {split!r}")
        return self.table.filter(pc.equal(self.table.column("split"), split))

    def dataset(self, split: Optional[str] = None, *, columns: Optional[Sequence[str]] = None,
                cache: Optional[bool] = None) -> "ray.data.Dataset":  # noqa: F821
        """A lazy dataset of decoded clips: columns video (uint8 T,H,W,3), label, caption, path, row_id,
        source_frames (or just ``columns``). ``cache`` (default: ``video.cache``) materialises the decoded
        clips; pass False when the caller adds steps and caches the end result itself."""
        import ray

        rows = self.rows(split)
        if columns is not None:
            known = set(rows.column_names) | {"video", "source_frames"}
            if "start" in rows.column_names or "end" in rows.column_names or self.spec.clips_per_video > 1:
                known |= {"clip_start_s", "clip_end_s"}
            unknown = [c for c in columns if c not in known]
            if unknown:
                raise ConfigError(f"unknown video dataset columns {unknown}; available: {sorted(known)}")
        if rows.num_rows == 0:
            raise ConfigError(f"video.manifest: {self.manifest_uri} has no rows for split {split!r}")
        sampling = self.spec.sampling
        if sampling == "auto":
            sampling = "random" if split == "train" else "uniform"
        stats = StatsRef(stats_actor(), StatsKey(uuid.uuid4().hex, int(self.table.num_rows), int(rows.num_rows)))
        self._track(split or "all", stats)
        # One block per decode batch: small blocks keep every decoder busy and memory flat.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_decoders = self.spec.num_decoders or max(1, int(cpus / self.spec.decoder_num_cpus))
        # a row cut into several clips yields that many: fewer rows per block keep blocks decode_batch_size clips
        rows_per_block = max(1, self.spec.decode_batch_size // self.spec.clips_per_video)
        blocks = [rows.slice(i, rows_per_block) for i in range(0, rows.num_rows, rows_per_block)]
        ds = ray.data.from_arrow(blocks)
        settings = {"spec": self.spec.to_dict(), "sampling": sampling, "stats": stats, "manifest": self.manifest_uri,
                    "columns": columns}
        if rows.num_rows <= self.spec.task_decode_max_rows:
            fn, kwargs = decode_batch, {"fn_kwargs": settings}
            compute = ray.data.TaskPoolStrategy(size=min(n_decoders, len(blocks)))
        else:
            fn, kwargs = ClipDecoder, {"fn_constructor_kwargs": settings}
            # Every decoder up front (the autoscaler was slow to add the second one on small data
            # sets); min_size=1 keeps the pipeline going when Train holds some of the CPUs.
            compute = ray.data.ActorPoolStrategy(min_size=1, max_size=n_decoders, initial_size=n_decoders)
        ds = ds.map_batches(fn, **kwargs, batch_size=rows_per_block, batch_format="numpy", compute=compute,
                            num_cpus=self.spec.decoder_num_cpus)
        # Columns are selected inside the decoder (one step, not a second pass over the decoded clips).
        if self.spec.cache if cache is None else cache:
            ds = ds.materialize()  # decoded once; every later epoch reads these blocks
        return ds

    def _track(self, split: str, stats: StatsRef) -> None:
        """Remember ``split``'s latest dataset; its entry (and every earlier one of this pipeline) is
        released from the stats actor when this pipeline is garbage collected."""
        if not self._keys:
            weakref.finalize(self, _release_stats, stats.actor, self._keys)
        self._keys.append(stats.key.key)
        self._stats[split] = stats

    def stats(self, split: Optional[str] = None) -> Dict[str, Any]:
        """Decode counts for a dataset built by :meth:`dataset` (after it has been consumed)."""
        key = split or "all"
        if key not in self._stats:
            raise KeyError(f"no dataset was built for split {key!r}")
        s = self._stats[key].summary()
        s["unseen"] = s["rows"] - s["decoded"] - s["dropped"]
        return s

    def warn_dropped(self, split: Optional[str] = None) -> Dict[str, Any]:
        """Log one warning with the drop count and the first few paths; returns the stats."""
        s = self.stats(split)
        if s["dropped"]:
            examples = ", ".join(f"{e['path']} ({e['reason']})" for e in s["dropped_examples"])
            log.warning("video pipeline (%s): dropped %d of %d files: %s", split or "all", s["dropped"], s["rows"], examples)
        return s
