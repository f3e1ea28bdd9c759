"""The Ray Data pipelines on a real local Ray over real mp4 files."""

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from heygen_ray.config import ConfigError, TextDataSpec, VideoDataSpec
from heygen_ray.data.synthetic import generate_dataset
from heygen_ray.data.text import TextPipeline
from heygen_ray.data.video import VideoPipeline

pytestmark = pytest.mark.slow


def consume(ds):
    return list(ds.iter_batches(batch_size=64, batch_format="numpy"))


def test_generation_on_ray_tasks_matches_in_process(ray_session, tmp_path, tiny_dataset):
    spec, res = tiny_dataset
    on_ray = generate_dataset(spec.model_copy(update={"output_dir": str(tmp_path), "clips_per_task": 7}), use_ray=True)
    assert pq.read_table(on_ray.manifest).column("sha256").to_pylist() == pq.read_table(res.manifest).column("sha256").to_pylist()


def test_video_pipeline_yields_one_row_per_clip(ray_session, tiny_dataset):
    spec, res = tiny_dataset
    pipe = VideoPipeline.from_spec(VideoDataSpec(manifest=res.manifest, clip_frames=6, height=24, width=40))
    batches = consume(pipe.dataset("val"))
    videos = np.concatenate([b["video"] for b in batches])
    expected = pq.read_table(res.manifest).to_pandas().query("split == 'val'")
    assert videos.shape == (len(expected), 6, 24, 40, 3) and videos.dtype == np.uint8
    labels = sorted(int(x) for b in batches for x in b["label"])
    assert labels == sorted(expected["label"].tolist())
    assert pipe.num_classes == 16 and pipe.label_names == spec.label_names
    s = pipe.stats("val")
    assert s["decoded"] == len(expected) and s["dropped"] == 0
    # a split of this size decodes in plain tasks; the actor pool of large splits decodes the same clips
    assert len(expected) <= pipe.spec.task_decode_max_rows
    pooled = VideoPipeline.from_spec(pipe.spec.model_copy(update={"task_decode_max_rows": 0}))
    by_id = lambda bs: {int(r): v for b in bs for r, v in zip(b["row_id"], b["video"])}  # noqa: E731
    a, b = by_id(batches), by_id(consume(pooled.dataset("val")))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_uniform_sampling_is_deterministic_random_is_not(ray_session, tiny_dataset):
    _, res = tiny_dataset
    pipe = VideoPipeline.from_spec(VideoDataSpec(manifest=res.manifest, clip_frames=4, sampling="auto"))
    by_id = lambda bs: {int(r): v for b in bs for r, v in zip(b["row_id"], b["video"])}  # noqa: E731
    a, b = by_id(consume(pipe.dataset("test"))), by_id(consume(pipe.dataset("test")))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    r1, r2 = by_id(consume(pipe.dataset("train"))), by_id(consume(pipe.dataset("train")))
    assert any(not np.array_equal(r1[k], r2[k]) for k in r1)


@pytest.fixture()
def damaged_manifest(tmp_path, tiny_dataset):
    """A copy of the tiny set with a missing file, a truncated file and a text file among the videos."""
    _, res = tiny_dataset
    root = tmp_path / "damaged"
    shutil.copytree(res.output_dir, root)
    table = pq.read_table(root / "manifest.parquet")
    rows = table.to_pylist()
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    (root / rows[train[0]]["path"]).unlink()
    data = (root / rows[train[1]]["path"]).read_bytes()
    (root / rows[train[1]]["path"]).write_bytes(data[: len(data) // 2])
    (root / rows[train[2]]["path"]).write_text("not a video\n" * 50)
    return root, table, {rows[i]["path"] for i in train[:3]}


@pytest.mark.parametrize("task_decode_max_rows", [256, 0], ids=["tasks", "actor_pool"])
def test_bad_files_are_dropped_and_counted(ray_session, damaged_manifest, caplog, task_decode_max_rows):
    root, table, bad = damaged_manifest
    pipe = VideoPipeline.from_spec(VideoDataSpec(manifest=str(root / "manifest.parquet"), task_decode_max_rows=task_decode_max_rows))
    n_train = sum(1 for s in table.column("split").to_pylist() if s == "train")
    got = sum(len(b["video"]) for b in consume(pipe.dataset("train")))
    assert got == n_train - 3
    with caplog.at_level(logging.WARNING):
        s = pipe.warn_dropped("train")
    assert s["dropped"] == 3 and s["decoded"] == n_train - 3
    assert {e["path"].split("damaged/")[1] for e in s["dropped_examples"]} == bad
    assert "dropped 3 of" in caplog.text
    # a second epoch does not double count
    consume(pipe.dataset("train"))
    assert pipe.stats("train")["dropped"] == 3


def test_every_file_bad_fails_clearly(ray_session, tmp_path):
    for i in range(5):
        (tmp_path / f"v{i}.mp4").write_bytes(b"garbage" * (i + 1))
    pacsv.write_csv(pa.table({"path": [f"v{i}.mp4" for i in range(5)], "label": list(range(5))}), tmp_path / "m.csv")
    pipe = VideoPipeline.from_spec(VideoDataSpec(manifest=str(tmp_path / "m.csv")))
    with pytest.raises(Exception, match="every one of the 5 videos listed in .*m.csv failed to decode"):
        consume(pipe.dataset())


def test_csv_and_jsonl_manifests_with_custom_columns(ray_session, tmp_path, tiny_dataset):
    _, res = tiny_dataset
    rows = pq.read_table(res.manifest).to_pylist()[:6]
    # absolute paths and other column names, as a user's own manifest might have
    own = [{"file": f"{res.output_dir}/{r['path']}", "cls": r["label"], "text": r["caption"]} for r in rows]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in own))
    pacsv.write_csv(pa.Table.from_pylist(own), tmp_path / "m.csv")
    for name in ("m.jsonl", "m.csv"):
        spec = VideoDataSpec.from_dict({"manifest": str(tmp_path / name),
                                        "columns": {"path": "file", "label": "cls", "caption": "text", "split": None}})
        batches = consume(VideoPipeline.from_spec(spec).dataset())
        assert sorted(c for b in batches for c in b["caption"]) == sorted(r["caption"] for r in rows)
    with pytest.raises(ConfigError, match="no column 'path'"):
        VideoPipeline.from_spec(VideoDataSpec(manifest=str(tmp_path / "m.csv")))
    with pytest.raises(ConfigError, match="file not found"):
        VideoPipeline.from_spec(VideoDataSpec(manifest=str(tmp_path / "nope.parquet")))


def test_text_pipeline_packs_and_tokenizes_captions(ray_session, tiny_dataset, tmp_path):
    spec, res = tiny_dataset
    tspec = TextDataSpec(corpus=res.corpus, tokenizer_dir=str(tmp_path / "tok"), vocab_size=400, seq_len=16, caption_max_tokens=24)
    text = TextPipeline.from_spec(tspec)
    assert text.trained_tokenizer and TextPipeline.from_spec(tspec).trained_tokenizer is False  # loaded, not retrained
    rows = consume(text.lm_dataset())
    ids = np.concatenate([b["input_ids"] for b in rows])
    labels = np.concatenate([b["labels"] for b in rows])
    assert ids.shape[1] == 16 and (ids[:, 1:] == labels[:, :-1]).all()
    n_tokens = sum(len(text.tokenizer.encode(json.loads(line)["text"])) + 1 for line in open(res.corpus))
    assert n_tokens - 17 < ids.size + len(ids) <= n_tokens  # every row is seq_len+1 stream tokens
    video = VideoPipeline.from_spec(VideoDataSpec(manifest=res.manifest, clip_frames=2, height=16, width=16))
    out = consume(text.add_caption_tokens(video.dataset("val")))
    b = out[0]
    assert b["caption_ids"].shape == (len(b["caption"]), 24)
    assert text.tokenizer.decode(b["caption_ids"][0]) == b["caption"][0]


def test_cache_decodes_once(ray_session, tiny_dataset):
    _, res = tiny_dataset
    pipe = VideoPipeline.from_spec(VideoDataSpec(manifest=res.manifest, clip_frames=4, sampling="random", cache=True))
    ds = pipe.dataset("train", columns=["video", "row_id"])
    by_id = lambda bs: {int(r): v for b in bs for r, v in zip(b["row_id"], b["video"])}  # noqa: E731
    first, second = by_id(consume(ds)), by_id(consume(ds))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    assert pipe.stats("train")["decoded"] == len(first)


def test_datasets_share_the_cluster_s_stats_actor_and_a_pipeline_releases_its_counts(ray_session, tiny_dataset):
    """Every dataset reports to one stats actor (not a process per dataset), each under its own key,
    and a pipeline that is garbage collected releases its entries (a long session does not collect
    one set of counts per dataset it ever built)."""
    import gc
    import time

    _, res = tiny_dataset
    spec = VideoDataSpec(manifest=res.manifest, clip_frames=4, height=16, width=16)
    a, b = VideoPipeline.from_spec(spec), VideoPipeline.from_spec(spec)
    n_val = sum(len(x["video"]) for x in consume(a.dataset("val")))
    n_train = sum(len(x["video"]) for x in consume(b.dataset("train")))
    assert n_val > 0 and a.stats("val")["decoded"] == n_val and b.stats("train")["decoded"] == n_train  # not mixed
    ra, rb = a._stats["val"], b._stats["train"]
    assert ra.actor._actor_id == rb.actor._actor_id and ra.key.key != rb.key.key
    actor = ra.actor
    assert {ra.key.key, rb.key.key} <= set(ray_session.get(actor.keys.remote()))
    gone = ra.key.key
    del a, ra
    gc.collect()
    deadline = time.monotonic() + 30
    while gone in ray_session.get(actor.keys.remote()) and time.monotonic() < deadline:
        time.sleep(0.2)
    keys = ray_session.get(actor.keys.remote())
    assert gone not in keys and rb.key.key in keys, "a collected pipeline's counts were kept (or another's dropped)"


def test_time_windows_and_several_clips_per_video_from_one_long_file(ray_session, tmp_path):
    """One 8 s file at 5 fps (frame t is a flat grey of 4 + 6 t, a keyframe every 5 frames), three manifest
    rows with windows, two clips per row: each clip holds the frames of its half of its window; the
    window past the end of the file is dropped and counted with its reason."""
    from heygen_ray.data.media import encode_mp4

    frames = np.stack([np.full((32, 32, 3), 4 + 6 * t, np.uint8) for t in range(40)])
    (tmp_path / "long.mp4").write_bytes(encode_mp4(frames, 5, gop=5))
    pacsv.write_csv(pa.table({"path": ["long.mp4"] * 3, "start": [0.0, 4.0, 20.0], "end": [4.0, None, 25.0]}),
                    tmp_path / "m.csv")
    spec = VideoDataSpec(manifest=str(tmp_path / "m.csv"), clip_frames=4, height=16, width=16, clips_per_video=2)
    pipe = VideoPipeline.from_spec(spec)
    rows = {}
    for b in consume(pipe.dataset(columns=["video", "row_id", "clip_start_s", "clip_end_s", "source_frames"])):
        for v, r, a, e, n in zip(b["video"], b["row_id"], b["clip_start_s"], b["clip_end_s"], b["source_frames"]):
            rows.setdefault(int(r), []).append((a, e, n, np.rint((v.mean(axis=(1, 2, 3)) - 4) / 6).astype(int).tolist()))
    # uniform TSN indices: 4 of 10 frames -> 1, 3, 6, 8
    assert sorted(rows[0]) == [(0.0, 2.0, 10, [1, 3, 6, 8]), (2.0, 4.0, 10, [11, 13, 16, 18])]
    assert sorted(rows[1]) == [(4.0, 6.0, 10, [21, 23, 26, 28]), (6.0, 8.0, 10, [31, 33, 36, 38])]  # no end: the file's
    s = pipe.stats()
    assert 2 not in rows and s["dropped"] == 1 and s["dropped_reasons"] == {"window": 1}
    assert "past the end of the video (8.00 s)" in s["dropped_examples"][0]["reason"]
    # a window that ends before it starts is a manifest error, named before anything runs
    pacsv.write_csv(pa.table({"path": ["long.mp4"], "start": [3.0], "end": [2.0]}), tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match=r"row 0 .*long.mp4.*ends at 2.0 s, not after its start 3.0 s"):
        VideoPipeline.from_spec(VideoDataSpec(manifest=str(tmp_path / "bad.csv")))
