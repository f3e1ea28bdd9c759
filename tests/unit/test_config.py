"""Spec validation: errors name the file and the dotted path, before anything runs."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from heygen_ray.config import (
    ConfigError,
    DataSpec,
    PipelineSpec,
    SynthSpec,
    VideoDataSpec,
    apply_overrides,
    load_spec,
    parse_override,
    spec_kind_for,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, data, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        spec = load_spec(spec_kind_for(path), path)
        assert spec.to_dict()  # every shipped preset is valid as is


def test_unknown_key_names_file_path_and_suggests(tmp_path):
    p = write(tmp_path, {"video": {"clip_frams": 8}})
    with pytest.raises(ConfigError) as e:
        load_spec(DataSpec, p)
    msg = str(e.value)
    assert str(p) in msg and "video.clip_frams" in msg and "did you mean 'clip_frames'" in msg


def test_wrong_type_names_path_and_value(tmp_path):
    p = write(tmp_path, {"synth": {"num_clips": "many"}})
    with pytest.raises(ConfigError) as e:
        load_spec(DataSpec, p)
    assert "synth.num_clips" in str(e.value) and "'many'" in str(e.value)


def test_float_for_int_fails_loudly():
    # A sweep sampler handing 8.0 to an int field must not be silently truncated.
    with pytest.raises(ConfigError, match="video.clip_frames"):
        DataSpec.from_dict({"video": {"clip_frames": 8.0}})
    # numpy integers (what Tune samples) are fine
    assert DataSpec.from_dict({"video": {"clip_frames": np.int64(8)}}).video.clip_frames == 8


def test_override_sets_nested_value_and_is_typed(tmp_path):
    p = write(tmp_path, {"video": {"clip_frames": 4}})
    spec = load_spec(DataSpec, p, ["video.clip_frames=12", "synth.colors=[red, blue]"])
    assert spec.video.clip_frames == 12 and spec.synth.colors == ["red", "blue"]


def test_bad_override_path_is_rejected_with_suggestion():
    with pytest.raises(ConfigError) as e:
        apply_overrides(DataSpec, {}, ["video.clip_frame=8"])
    assert "video.clip_frame" in str(e.value) and "clip_frames" in str(e.value)
    with pytest.raises(ConfigError, match="expected dotted.path=value"):
        parse_override("video.clip_frames")


def test_impossible_combinations_fail():
    with pytest.raises(ConfigError, match="would drop every generated clip"):
        DataSpec.from_dict({"synth": {"frames": 8}, "video": {"clip_frames": 16, "short_clips": "drop"}})
    with pytest.raises(ConfigError, match="sum to 1.0"):
        DataSpec.from_dict({"synth": {"split": {"train": 0.9, "val": 0.2, "test": 0.1}}})
    with pytest.raises(ConfigError, match="even"):
        SynthSpec.from_dict({"height": 63})
    with pytest.raises(ConfigError, match="synth.colors.*unknown colors"):
        DataSpec.from_dict({"synth": {"colors": ["red", "mauve"]}})
    with pytest.raises(ConfigError, match="video.manifest"):
        DataSpec.from_dict({"synth": None})


def test_defaults_resolve_from_synth_dir():
    spec = DataSpec.from_dict({"synth": {"output_dir": "/x/y"}})
    assert spec.video.manifest == "/x/y/manifest.parquet"
    assert spec.text.corpus == "/x/y/corpus.jsonl" and spec.text.tokenizer_dir == "/x/y/tokenizer"


def test_dump_round_trip_and_fingerprint(tmp_path):
    spec = load_spec(PipelineSpec, REPO / "configs/pipeline/quickstart.yaml", ["data.video.height=48"])
    again = load_spec(PipelineSpec, write(tmp_path, yaml.safe_load(spec.to_yaml())))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert load_spec(PipelineSpec, data=spec.to_dict(), overrides=["data.video.height=40"]).fingerprint() != spec.fingerprint()


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_spec(DataSpec, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("video: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(DataSpec, bad)


def test_label_names_are_shape_by_direction():
    spec = SynthSpec()
    assert len(spec.label_names) >= 12 and spec.label_names[0] == "circle_left"
    assert len(set(spec.label_names)) == len(spec.label_names)


def test_video_spec_rejects_unknown_sampling():
    with pytest.raises(ConfigError, match="sampling"):
        VideoDataSpec.from_dict({"sampling": "every_other"})


def test_training_caches_a_small_validation_split_and_the_train_split_only_when_asked():
    from heygen_ray.config import VideoDataSpec

    v = VideoDataSpec(clip_frames=8, height=32, width=32)  # 24 KB a clip
    assert v.decoded_mb(1024) == 24.0
    assert v.cache_split("val", 1024) and not v.cache_split("train", 1024)
    assert not v.cache_split("val", 50_000)  # 1.2 GB: streamed at every evaluation
    assert not VideoDataSpec(cache_eval_max_mb=0).cache_split("val", 1)
    assert VideoDataSpec(cache=True).cache_split("train", 10**6)
