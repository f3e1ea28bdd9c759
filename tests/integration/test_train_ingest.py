"""A decoded-clip dataset consumed by a real 2-worker Ray Train run through get_dataset_shard."""

import pytest

from heygen_ray.config import VideoDataSpec
from heygen_ray.data.video import VideoPipeline

pytestmark = pytest.mark.slow


def _loop(config):
    import ray.train
    import torch

    from heygen_ray.data.transforms import video_to_float

    shard = ray.train.get_dataset_shard("train")
    seen, labels = 0, []
    for batch in shard.iter_torch_batches(batch_size=4, dtypes={"video": torch.uint8, "label": torch.int64}):
        x = video_to_float(batch["video"])
        assert x.shape[1:] == (3, 4, 16, 16) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
        seen += len(x)
        labels += batch["label"].tolist()
    ctx = ray.train.get_context()
    import tempfile

    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/rank{ctx.get_world_rank()}.txt", "w").write(",".join(map(str, labels)))
        ray.train.report({"seen": seen, "rank": ctx.get_world_rank()}, checkpoint=Checkpoint.from_directory(d))


def test_two_worker_train_run_consumes_the_shards(ray_session, tiny_dataset, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    _, res = tiny_dataset
    pipe = VideoPipeline.from_spec(VideoDataSpec(manifest=res.manifest, clip_frames=4, height=16, width=16))
    ds = pipe.dataset("train", columns=["video", "label"])
    n_train = pipe.rows("train").num_rows
    result = TorchTrainer(
        _loop,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="ingest", storage_path=str(tmp_path)),
        datasets={"train": ds},
    ).fit()
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        per_rank = [open(f"{d}/rank{r}.txt").read().split(",") for r in (0, 1)]
    # equal split across the two workers, every clip seen exactly once
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    seen = len(per_rank[0]) + len(per_rank[1])
    assert sorted(map(int, per_rank[0] + per_rank[1])) == sorted(pipe.rows("train").column("label").to_pylist())[:seen]
    assert len(per_rank[0]) + len(per_rank[1]) >= n_train - 1


class _Counted:
    """A real Ray DataIterator that counts its executions (one per iter_torch_batches call)."""

    def __init__(self, it):
        self.it, self.executions = it, 0

    def iter_torch_batches(self, **kw):
        self.executions += 1
        return self.it.iter_torch_batches(**kw)


def _epochs(gen, n):
    out = {}
    for epoch, batch in gen:
        if epoch >= n:
            return out
        out.setdefault(epoch, []).append(batch["x"].tolist())
    return out


def test_a_held_shard_runs_the_dataset_once_and_reshuffles_by_seed_and_epoch(ray_session):
    """A materialised split of 50 rows, micro-batches of 8: the first epoch streams from Ray Data and is
    kept; epochs 1.. are permutations of the same 50 rows (6 full batches each), the same for the same
    seed and different for another; past hold_mb, every epoch is a new execution, as before."""
    import ray.data
    import torch

    from heygen_ray.config import TrainSpec
    from heygen_ray.train.loop import batches

    ds = ray.data.from_items([{"x": i} for i in range(50)]).materialize()

    class XTask:  # a task lends batches() only its column dtypes
        dtypes = {"x": torch.int64}

    def run(seed, hold_mb, epochs=4):
        it = _Counted(ds.iterator())
        spec = TrainSpec.from_dict({"name": "h", "task": "language_modeling", "batch_size": 8, "seed": seed})
        return _epochs(batches(it, spec, XTask, 0, hold_mb), epochs), it

    held, it = run(0, 1.0)
    assert it.executions == 1 and sorted(held) == [0, 1, 2, 3]
    for epoch, rows in held.items():
        assert len(rows) == 6 and all(len(b) == 8 for b in rows)  # full micro-batches only
        flat = [x for b in rows for x in b]
        assert len(set(flat)) == 48 and set(flat) <= set(range(50))
    assert held[1] != held[2]  # each epoch its own order
    again, _ = run(0, 1.0)
    other, _ = run(1, 1.0)
    assert [again[e] for e in (1, 2, 3)] == [held[e] for e in (1, 2, 3)]  # (seed, epoch) decides the order
    assert [other[e] for e in (1, 2, 3)] != [held[e] for e in (1, 2, 3)]
    streamed, it = run(0, 1e-6)  # 8 int64 rows are more than a millionth of a MB: not held
    # one execution per epoch: 0-3 and the one epoch 4 began with when the loop stopped
    assert it.executions == 5 and all(len(rows) == 6 for rows in streamed.values())
