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
