"""PyAV decoding: sampling numerics, sizes, frame rates, codecs, and bad files."""

import io

import av
import numpy as np
import pytest

from heygen_ray.data.decode import DecodeError, decode_clip, sample_indices
from heygen_ray.data.synthetic import encode_mp4


def test_uniform_sampling_hand_computed():
    assert sample_indices(16, 8, "uniform").tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(10, 4, "uniform").tolist() == [1, 3, 6, 8]  # floor(2.5*(i+0.5))
    assert sample_indices(8, 8, "uniform").tolist() == list(range(8))
    assert sample_indices(3, 5, "uniform").tolist() == [0, 1, 2, 2, 2]  # pad with the last frame


def test_random_sampling_stays_in_segments():
    rng = np.random.default_rng(0)
    draws = np.stack([sample_indices(40, 8, "random", rng) for _ in range(200)])
    seg = np.arange(8) * 5
    assert ((draws >= seg) & (draws < seg + 5)).all()
    assert len({tuple(d) for d in draws}) > 100  # it is random
    with pytest.raises(ValueError):
        sample_indices(10, 4, "middle")


def ramp_video(T, H, W):
    """Frame t is a flat grey of value 10 + 12 t: decoded frames identify themselves."""
    return np.stack([np.full((H, W, 3), 10 + 12 * t, np.uint8) for t in range(T)])


@pytest.mark.parametrize("T,H,W,fps", [(16, 64, 64, 8), (20, 48, 80, 25), (12, 120, 160, 30), (9, 32, 32, 1)])
def test_decodes_sizes_and_rates(T, H, W, fps):
    data = encode_mp4(ramp_video(T, H, W), fps)
    clip, n = decode_clip(data, 8, 24, 40, sampling="uniform")
    assert n == T and clip.shape == (8, 24, 40, 3) and clip.dtype == np.uint8
    idx = sample_indices(T, 8, "uniform")
    assert np.allclose(clip.mean(axis=(1, 2, 3)), 10 + 12 * idx, atol=3)


def test_other_codec_and_container():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in ramp_video(10, 48, 64):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    clip, n = decode_clip(buf.getvalue(), 5, 16, 16)
    assert n == 10 and clip.shape == (5, 16, 16, 3)


def test_short_clips_pad_or_drop():
    data = encode_mp4(ramp_video(4, 32, 32), 8)
    clip, n = decode_clip(data, 6, 32, 32, short_clips="pad")
    assert n == 4 and np.allclose(clip[3:].mean(axis=(1, 2, 3)), clip[3].mean())
    with pytest.raises(DecodeError, match="clip_frames=6"):
        decode_clip(data, 6, 32, 32, short_clips="drop")


def test_center_crop_keeps_aspect():
    frames = np.zeros((4, 32, 64, 3), np.uint8)
    frames[:, :, :16] = 255  # white left quarter is cropped away by a centre crop to a square
    data = encode_mp4(frames, 8)
    squash, _ = decode_clip(data, 2, 32, 32, resize="squash")
    crop, _ = decode_clip(data, 2, 32, 32, resize="center_crop")
    assert squash[:, :, :4].mean() > 200 and crop[:, :, :4].mean() < 30


@pytest.mark.parametrize("bad,reason", [
    (b"", "empty"),
    (b"this is not a video at all" * 40, "InvalidData"),
])
def test_garbage_raises_decode_error(bad, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_clip(bad, 8, 32, 32)


def test_truncated_and_audio_only_files():
    data = encode_mp4(ramp_video(16, 64, 64), 8)
    for cut in (len(data) // 3, len(data) - 200):
        with pytest.raises(DecodeError):
            decode_clip(data[:cut], 8, 32, 32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(DecodeError, match="no video stream"):
        decode_clip(buf.getvalue(), 8, 32, 32)


def ramp40(gop=None):
    """40 frames at 10 fps (4 s); frame t is a flat grey of 4 + 6 t; a keyframe every `gop` frames."""
    from heygen_ray.data.media import encode_mp4 as enc

    frames = np.stack([np.full((32, 32, 3), 4 + 6 * t, np.uint8) for t in range(40)])
    return enc(frames, 10, gop=gop)


def frame_numbers(clip):
    return np.rint((clip.mean(axis=(1, 2, 3)) - 4) / 6).astype(int).tolist()


@pytest.mark.parametrize("gop", [None, 8])
def test_a_window_samples_its_own_frames_after_seeking(gop):
    data = ramp40(gop)
    # [1.0 s, 2.0 s) holds frames 10..19; uniform TSN indices of 4 out of 10 are 1, 3, 6, 8
    clip, n = decode_clip(data, 4, 16, 16, sampling="uniform", start_s=1.0, end_s=2.0)
    assert n == 10 and frame_numbers(clip) == [11, 13, 16, 18]
    # a window that starts between keyframes (gop 8: the seek lands on frame 24, decoding runs on)
    clip, n = decode_clip(data, 5, 16, 16, sampling="uniform", start_s=2.5, end_s=3.5)
    assert n == 10 and frame_numbers(clip) == [26, 28, 30, 32, 34]
    # an end past the video is cut at its end; no end means to the end
    clip, n = decode_clip(data, 5, 16, 16, sampling="uniform", start_s=3.0, end_s=60.0)
    assert n == 10 and frame_numbers(clip) == [31, 33, 35, 37, 39]
    assert decode_clip(data, 5, 16, 16, sampling="uniform", start_s=3.0)[0].tolist() == clip.tolist()


def test_a_window_past_the_end_or_empty_is_a_decode_error_with_its_reason():
    data = ramp40()
    with pytest.raises(DecodeError, match=r"window: starts at 5.00 s, past the end of the video \(4.00 s\)"):
        decode_clip(data, 4, 16, 16, start_s=5.0, end_s=6.0)
    with pytest.raises(DecodeError, match=r"window: .*2 frames < clip_frames=4"):
        decode_clip(data, 4, 16, 16, start_s=1.0, end_s=1.2, short_clips="drop")


def test_a_file_is_read_as_a_stream_from_a_path_or_a_pyarrow_file(tmp_path):
    import pyarrow.fs as pafs

    data = ramp40(8)
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    want = decode_clip(data, 4, 16, 16, sampling="uniform", start_s=1.0, end_s=2.0)[0]
    assert decode_clip(str(path), 4, 16, 16, sampling="uniform", start_s=1.0, end_s=2.0)[0].tolist() == want.tolist()
    with pafs.LocalFileSystem().open_input_file(str(path)) as f:
        got = decode_clip(f, 4, 16, 16, sampling="uniform", start_s=1.0, end_s=2.0)[0]
    assert got.tolist() == want.tolist()
    assert decode_clip(str(path), 8, 16, 16)[0].tolist() == decode_clip(data, 8, 16, 16)[0].tolist()


def test_decode_stats_counts_each_dataset_apart_once_per_row_and_forgets_the_least_recently_used():
    """The stats actor's bookkeeping, in-process: rows counted once per dataset whatever the epochs,
    datasets kept apart, the oldest forgotten beyond the cap, a report recreating its entry."""
    from heygen_ray.data.video import MAX_REPORTED_PATHS, DecodeStats, StatsKey

    st = DecodeStats(max_datasets=2)
    a, b, c = (StatsKey(k, manifest_rows=10, num_rows=4) for k in "abc")
    bad = [{"row_id": 3, "path": "x.mp4", "reason": "truncated: moov atom not found"}]
    assert st.report(a, [0, 1, 2], bad) is False
    assert st.report(a, [0, 1, 2], bad) is False  # a second epoch: nothing double counted
    assert st.summary(a) == {"rows": 4, "decoded": 3, "dropped": 1, "dropped_reasons": {"truncated": 1},
                             "dropped_examples": [{"path": "x.mp4", "reason": "truncated: moov atom not found"}]}
    # every row of b dropped: the decoder's cue to fail the pipeline
    many = [{"row_id": i, "path": f"{i}.mp4", "reason": "missing: file not found"} for i in (4, 5, 6)]
    assert st.report(b, [], many) is False and st.report(b, [], many + [{**many[0], "row_id": 7}]) is True
    assert st.summary(b)["dropped"] == 4 and st.summary(a)["decoded"] == 3  # apart
    assert len(st.summary(b)["dropped_examples"]) == min(4, MAX_REPORTED_PATHS)
    st.summary(a)  # a is now the most recently used
    st.report(c, [0], [])
    assert st.keys() == ["a", "c"]  # b, the least recently used, forgotten
    assert st.summary(b)["decoded"] == 0 and st.keys() == ["c", "b"]  # recreated empty, a now the oldest
    st.release(["c", "nope"])
    assert st.keys() == ["b"]
