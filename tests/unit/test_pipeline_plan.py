"""The pipeline's plan (every stage spec validated before anything runs), its ownership of the data
set, run folders and aliases, the dependency closure of --force, content keys and the ledger."""

import os

import pytest

from heygen_ray.config import ConfigError, PipelineSpec, load_spec
from heygen_ray.pipeline import Ledger, downstream, plan_pipeline, unit_key

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs/pipeline/quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # stage configs are relative to the working directory, as for a user


def _spec(*overrides):
    return load_spec(PipelineSpec, QUICKSTART, ["output_dir=/tmp/hr_plan", *overrides])


def test_plan_validates_every_stage_and_owns_data_folders_and_alias():
    spec = _spec()
    units = plan_pipeline(spec)
    assert [u.name for u in units] == ["data", "train.video_classifier", "train.video_text_matching", "train.text_to_video",
                                       "tune", "compress", "evaluate.test", "evaluate.unseen", "serve"]
    synth = spec.data.synth.to_dict()
    by = {u.name: u for u in units}
    for name in ("train.video_classifier", "train.video_text_matching", "train.text_to_video"):
        s = by[name].spec
        assert s.data.synth.to_dict() == synth and s.run_dir == "/tmp/hr_plan/train" and s.name == name.split(".")[1]
    # the entries' overrides over the stage YAML; a training that reads another's model depends on it
    t2v = by["train.text_to_video"]
    assert t2v.spec.judge.model == "models:/video_classifier@champion" and t2v.spec.model.init_from.freeze
    assert t2v.deps == ["data", "train.video_text_matching", "train.video_classifier"]
    assert by["train.video_text_matching"].deps == ["data", "train.video_classifier"]
    assert by["train.video_text_matching"].spec.model.init_from.target_prefix == "video."
    # the evaluation's data: the pipeline's set drawn with another seed, in its own folder
    test = by["evaluate.test"]  # no data_overrides: the pipeline's own manifest and its test split
    assert test.deps == ["train.video_classifier"] and test.spec.synth.to_dict() == synth
    ev = by["evaluate.unseen"]
    assert ev.deps == ["train.video_classifier"] and ev.spec.synth.seed == 1 and ev.spec.synth.num_clips == 400
    assert ev.spec.video.manifest == "data/quickstart_unseen/manifest.parquet"
    assert ev.spec.text.tokenizer_dir == spec.data.text.tokenizer_dir  # the models' own tokenizer
    assert by["tune"].spec.train["data"]["synth"] == synth and by["tune"].spec.run_dir == "/tmp/hr_plan/tune"
    c = by["compress"].spec
    assert c.train.data.synth.to_dict() == synth and c.gate.alias == "champion" and c.teacher is None
    assert by["compress"].deps == ["train.video_classifier"]
    assert by["serve"].deps == ["compress", "train.text_to_video", "train.video_text_matching", "tune"]


def test_smoke_sizes_apply_after_the_entry_overrides():
    units = {u.name: u for u in plan_pipeline(_spec("smoke=true"))}
    assert units["train.video_classifier"].spec.steps == 12  # SMOKE_OVERRIDES["train"], not the entry's 480
    assert units["compress"].spec.train.steps == 12 and units["compress"].spec.teacher_steps == 24
    # the entry's smoke_overrides come last: the sweep's smoke size is 4 trials, the quickstart's tune 2
    assert units["tune"].spec.search.num_samples == 2
    assert {u.name: u for u in plan_pipeline(_spec("smoke=true", "tune.smoke_overrides={}"))}["tune"].spec.search.num_samples == 4
    full = {u.name: u for u in plan_pipeline(_spec("tune.smoke_overrides={search.num_samples: 7}"))}
    assert full["tune"].spec.search.num_samples == 2  # not without --smoke-test


def test_a_bad_stage_config_fails_before_anything_runs_naming_stage_and_field():
    with pytest.raises(ConfigError) as err:
        plan_pipeline(_spec("train.video_classifier.overrides={optim.lrr: 0.1}"))
    msg = str(err.value)
    assert "train.video_classifier" in msg and "optim.lrr" in msg and "configs/train/video_classification.yaml" in msg
    with pytest.raises(ConfigError, match="compress.*prune.ratio"):
        plan_pipeline(_spec("compress.overrides={prune.ratio: 1.5}"))
    with pytest.raises(ConfigError, match="tune.config"):
        plan_pipeline(_spec("tune.config=configs/sweep/nope.yaml"))
    with pytest.raises(ConfigError, match="serve.*limits.max_tokens"):
        plan_pipeline(_spec("serve.overrides={limits.max_tokens: 0}"))


@pytest.mark.parametrize("override, message", [
    ("stages=[train,data]", "in the order"),
    ("compress.teacher=nope", "compress.teacher"),
    ("serve.generate=train.nope", "serve.generate"),
    ("stages=[data,compress]", "compress needs its teacher"),
    ("train.video_classifier.gate={metric: a, min_value: 1, max_value: 2}", "exactly one"),
    ("evaluate.unseen.model=train.nope", "evaluate.unseen.model"),
])
def test_pipeline_spec_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        _spec(override)


def test_a_training_that_uses_a_later_entrys_model_is_refused():
    with pytest.raises(ConfigError, match="comes later"):
        plan_pipeline(_spec("train.video_classifier.overrides={model.init_from: {uri: 'models:/text_to_video@champion'}}"))


def test_force_reruns_the_stage_and_everything_downstream():
    units = plan_pipeline(_spec())
    assert downstream(units, ["train"]) == ["train.video_classifier", "train.video_text_matching", "train.text_to_video",
                                            "compress", "evaluate.test", "evaluate.unseen", "serve"]
    assert downstream(units, ["train.text_to_video"]) == ["train.text_to_video", "serve"]
    # a new classifier retrains what starts from it or is judged by it
    assert downstream(units, ["train.video_classifier"]) == ["train.video_classifier", "train.video_text_matching",
                                                             "train.text_to_video", "compress", "evaluate.test", "evaluate.unseen", "serve"]
    assert downstream(units, ["data"]) == [u.name for u in units]
    assert downstream(units, ["serve"]) == ["serve"]
    with pytest.raises(ConfigError, match="--force nope"):
        downstream(units, ["nope"])


def test_content_key_follows_spec_inputs_data_and_code(tmp_path):
    units = {u.name: u for u in plan_pipeline(_spec())}
    u = units["train.video_classifier"]
    k = unit_key(u, {"data": "d1"}, "fp1", "c1")
    assert k == unit_key(u, {"data": "d1"}, "fp1", "c1")  # deterministic
    assert len({k, unit_key(u, {"data": "d2"}, "fp1", "c1"), unit_key(u, {"data": "d1"}, "fp2", "c1"),
                unit_key(u, {"data": "d1"}, "fp1", "c2")}) == 4
    other = {x.name: x for x in plan_pipeline(_spec("train.video_classifier.overrides={steps: 241}"))}
    assert unit_key(other["train.video_classifier"], {"data": "d1"}, "fp1", "c1") != k

    ledger = Ledger(str(tmp_path / "ledger.json"))
    ledger.record("data", key="abc", status="running")
    ledger.record("data", status="finished", outputs={"clips": 3})
    again = Ledger(str(tmp_path / "ledger.json"))
    assert again.get("data")["key"] == "abc" and again.get("data")["status"] == "finished"
    assert again.get("data")["outputs"] == {"clips": 3} and again.get("train") is None


def test_smoke_sizes_fit_a_pipeline_without_a_serve_stage(tmp_path):
    """--smoke-test on a pipeline that names no serve section validates (the smoke sizes add none), and
    plans only its own stages."""
    from heygen_ray.config import SMOKE_OVERRIDES

    cfg = tmp_path / "p.yaml"
    cfg.write_text("stages: [data, train]\ndata: {synth: {num_clips: 48}}\n"
                   "train: {lm: {config: configs/train/language_modeling.yaml}}\n")
    spec = load_spec(PipelineSpec, str(cfg), list(SMOKE_OVERRIDES["pipeline"]))
    assert spec.smoke and spec.serve is None
    assert [u.name for u in plan_pipeline(spec)] == ["data", "train.lm"]
