"""Compression sweeps (``stage: compress``) planned and validated without a cluster: CompressSpec paths,
the paths every trial must share, ASHA rejected, the metric names, the trial's spec, its CPUs, its one
report and the best config."""

import os

import numpy as np
import pytest
import yaml

from heygen_ray.config import SMOKE_OVERRIDES, CompressSpec, ConfigError, SweepSpec, load_spec
from heygen_ray.tune.sweep import TRIAL_TAG, concurrency_for, plan_sweep, trial_cpus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/sweep/compress_video_classifier.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def plan(*overrides):
    return plan_sweep(load_spec(SweepSpec, CONFIG, list(overrides)))


def test_the_shipped_compress_sweep_plans_against_the_compression_spec():
    p = plan()
    assert p.stage.name == "compress" and p.space.spec_cls is CompressSpec
    assert p.objectives == [("quality", "max"), ("p50_ms_bs1", "min")]
    assert set(p.space.paths) == {"prune.ratio", "distill.temperature", "distill.alpha", "quantize.scheme"}
    # the base is the compression YAML with the sweep's train section merged over it, paths absolute
    assert p.base["teacher_steps"] == 200 and p.base["train"]["steps"] == 60 and p.base["prune"]["unstructured_control"] is None
    assert os.path.isabs(p.base["run_dir"]) and os.path.isabs(p.base["train"]["data"]["synth"]["output_dir"])
    assert p.portable["run_dir"] == "runs" and p.max_steps == 60
    # the default metric is the final variant's quality, in the task's direction
    d = plan("metric=null", "mode=null")
    assert (d.metric, d.mode) == ("quality", "max")


@pytest.mark.parametrize("override, needle", [
    ("space.prune.ration={uniform: [0.1, 0.5]}", "space.prune.ration: PruneSpec has no field 'ration' at prune (did you mean 'ratio'?)"),
    ("space.distil.alpha={uniform: [0.1, 0.5]}", "space.distil.alpha: CompressSpec has no field 'distil'"),
    # the upper end of a range outside the field's bounds (ratio < 1)
    ("space.prune.ratio={uniform: [0.5, 1.0]}", "space.prune.ratio: the upper end of uniform[0.5, 1.0] is invalid for CompressSpec"),
    # a sampled float for an int field
    ("space.quantize.calibration_batches={uniform: [2, 8]}", "valid integer"),
    ("space.quantize.scheme={choice: [int8_static, int4]}", "space.quantize.scheme: the choice value 'int4'"),
    ("space.distill.alpha={uniform: [0.5, 1.5]}", "space.distill.alpha: the upper end"),
])
def test_a_wrong_compress_path_or_sample_fails_before_ray_naming_the_path(override, needle):
    with pytest.raises(ConfigError) as err:
        plan(override)
    assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("path", ["teacher_steps", "train.data.synth.num_clips", "train.model.name", "measure.rounds"])
def test_what_every_trial_must_share_cannot_be_swept(path):
    with pytest.raises(ConfigError, match=rf"space\.{path}: .* the same for every trial"):
        plan(f"space.{path}={{choice: [1, 2]}}")


def test_training_paths_of_the_student_can_be_swept_and_set_the_planned_step():
    p = plan("space.train.steps={choice: [20, 30]}", "space.train.optim.lr={loguniform: [1.0e-3, 1.0e-2]}")
    assert p.max_steps == 60  # the base's 60 is longer than either choice
    assert p.stage.planned_steps(p, {"train.steps": 20}) == 20
    with pytest.raises(ConfigError, match=r"(?s)space.train.steps: the lower end of uniform\[20.0, 30.0\].*valid integer"):
        plan("space.train.steps={uniform: [20, 30]}")


def test_asha_is_rejected_for_a_compress_sweep_and_the_default_scheduler_is_none():
    with pytest.raises(ConfigError, match=r"scheduler\.kind: asha stops trials on their intermediate reports"):
        plan("scheduler.kind=asha")
    data = {"stage": "compress", "base": "configs/compress/video_classifier.yaml", "space": {"prune.ratio": {"choice": [0.5]}}}
    assert SweepSpec.from_dict(data).scheduler.kind == "none"
    assert SweepSpec.from_dict({**data, "scheduler": {"reduction_factor": 3}}).scheduler.kind == "none"
    # train sweeps keep ASHA as their default
    assert SweepSpec.from_dict({**data, "stage": "train", "base": "configs/train/video_classification.yaml",
                                "space": {"optim.lr": {"choice": [1e-3]}}}).scheduler.kind == "asha"


def test_a_metric_a_compress_trial_does_not_report_is_rejected():
    with pytest.raises(ConfigError, match=r"metric 'p50_ms_bs' is not reported by a compress trial \(did you mean 'p50_ms_bs[18]'\?\)"):
        plan("objectives=[{metric: p50_ms_bs, mode: min}]")
    with pytest.raises(ConfigError, match="metric 'val_top1' is not reported"):
        plan("metric=val_top1")


def test_a_compress_trial_holds_its_driver_its_distillation_workers_and_a_decoder():
    p = plan()
    assert trial_cpus(p) == pytest.approx(0.01 + 2 * 0.5 + 0.5)
    assert concurrency_for(p, 2.0) == 1  # on 2 CPUs: one trial at a time
    assert concurrency_for(plan("max_concurrent_trials=2"), 4.0) == 2
    wide = plan("space.train.scaling.num_workers={choice: [1, 3]}", "max_concurrent_trials=4")
    assert trial_cpus(wide) == pytest.approx(0.01 + 3 * 0.5 + 0.5)
    with pytest.raises(ConfigError, match="one trial needs 2.01 CPUs"):
        concurrency_for(wide, 2.0)


def _ctx(p, teacher="/abs/teacher/ckpt"):
    return {"base": p.base, "name": p.spec.name, "trials_dir": p.trials_dir, "cwd": REPO, "teacher_uri": teacher,
            "tracking": {"enabled": True, "tracking_uri": "sqlite:////tmp/x.db", "experiment": "sweeps",
                         "parent_run_id": "parent123", "tags": {"heygen_ray.sweep": p.spec.name}}}


def test_the_trial_spec_has_its_own_folder_the_shared_teacher_nested_tracking_and_no_registration():
    from heygen_ray.tune.compress import compress_trial_spec

    p = plan()
    assert p.base["registered_model_name"] == "video_classifier_compressed"
    values = {"prune.ratio": np.float64(0.4), "distill.temperature": 3.0, "distill.alpha": 0.5, "quantize.scheme": "int8_dynamic"}
    spec = compress_trial_spec(_ctx(p), values, "t0001")
    assert spec.name == "compress_video_classifier_t0001" and spec.run_dir == p.trials_dir
    assert spec.teacher == "/abs/teacher/ckpt" and spec.prune.ratio == 0.4 and spec.quantize.scheme == "int8_dynamic"
    assert (spec.distill.temperature, spec.distill.alpha) == (3.0, 0.5)
    assert spec.registered_model_name is None and spec.tracking.registered_model_name is None
    assert p.base["quantize"]["export_pt2"] is True and spec.quantize.export_pt2 is False
    # of the reference variants, only the bf16 teacher: the trial reports the final variant's speedup over it
    assert len(p.base["measure"]["variants"]) == 5 and spec.measure.variants == ["teacher_bf16"]
    assert spec.tracking.parent_run_id == "parent123" and spec.tracking.experiment == "sweeps"
    assert spec.tracking.tags[TRIAL_TAG] == "t0001" and spec.tracking.tags["heygen_ray.sweep"] == p.spec.name
    # re-validated on arrival: a float drawn for an int field fails, naming the path
    q = plan("space.train.steps={choice: [20, 40]}")
    with pytest.raises(ConfigError, match=r"trial t0002 .*train.steps: Input should be a valid integer"):
        compress_trial_spec(_ctx(q), {**values, "train.steps": 20.0}, "t0002")


def test_the_trial_reports_the_final_variants_figures_once():
    from heygen_ray.tune.compress import REPORT_KEYS, trial_result

    def row(variant, quality, p50):
        return {"variant": variant, "quality": quality, "quality_delta": quality - 0.9, "params": 100, "size_bytes": 400,
                "flops_per_sample": 1e6, "p50_ms_bs1": p50, "p95_ms_bs1": p50, "p50_ms_bs8": 4 * p50, "p95_ms_bs8": 4 * p50,
                "throughput_bs8": 8.0, "speedup_bs1_vs_fp32": 1.0, "speedup_bs1_vs_bf16": 1.0, "speedup_bs8_vs_fp32": 1.0,
                "speedup_bs8_vs_bf16": 1.0, "passes_gate": True, "metrics": {"top1": quality}}

    spec = CompressSpec.from_dict({"train": {"steps": 12}})
    out = {"final_variant": "pruned_distilled_int8_static",
           "variants": [row("teacher_fp32", 0.9, 2.0), row("pruned", 0.5, 1.5), row("pruned_distilled_int8_static", 0.8, 0.5)]}
    r = trial_result(out, spec)
    assert set(r) == set(REPORT_KEYS)
    assert (r["quality"], r["p50_ms_bs1"], r["teacher_quality"], r["teacher_p50_ms_bs1"], r["step"]) == (0.8, 0.5, 0.9, 2.0, 12)
    assert r["quality_delta"] == pytest.approx(-0.1)
    assert trial_result(out, CompressSpec.from_dict({"distill": {"enabled": False}}))["step"] == 0


def test_the_best_config_is_a_ready_to_run_compression_yaml_with_the_sweeps_teacher(tmp_path):
    p = plan()
    p.extra["teacher_uri"] = "/abs/sweep/teacher/checkpoint_000001"
    params = {"prune.ratio": 0.3, "distill.temperature": 1.5, "distill.alpha": 0.8, "quantize.scheme": "int8_dynamic"}
    cfg = p.stage.best_config(p, params)
    path = tmp_path / "best_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    spec = load_spec(CompressSpec, path)
    assert spec.name == "compress_video_classifier_best" and spec.teacher == "/abs/sweep/teacher/checkpoint_000001"
    assert (spec.prune.ratio, spec.distill.temperature, spec.distill.alpha, spec.quantize.scheme) == (0.3, 1.5, 0.8, "int8_dynamic")
    assert spec.run_dir == "runs" and spec.train.steps == 60  # as written, with the sweep's train section
    assert spec.registered_model_name == "video_classifier_compressed" and spec.tracking.parent_run_id is None
    assert p.stage.run_command == "heygen-ray compress"


def test_smoke_sizes_shrink_a_compress_sweep():
    p = plan(*SMOKE_OVERRIDES["sweep_compress"])
    assert p.spec.search.num_samples == 2 and p.base["teacher_steps"] == 24 and p.base["train"]["steps"] == 12
    assert p.base["measure"]["rounds"] == 2 and p.base["train"]["data"]["synth"]["num_clips"] == 48


def test_optuna_proposes_compress_values_for_both_objectives():
    from heygen_ray.tune.sweep import _searcher

    p = plan("search.seed=3")
    searcher = _searcher(p, concurrency=1)
    assert searcher.set_search_properties(None, None, {"params": p.space.to_tune()})
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        built = p.space.build(config["params"])
        assert 0.25 <= built.prune.ratio <= 0.75 and built.quantize.scheme in ("int8_static", "int8_dynamic", "int8_qat")
        searcher.on_trial_complete(f"t{i}", {"quality": 0.5 + 0.1 * i, "p50_ms_bs1": 1.0 + i, "config": config})


def test_the_best_trial_breaks_ties_on_the_next_objective_so_it_is_on_the_pareto_front():
    from heygen_ray.tune.sweep import _better_row, pareto_front

    objectives = [("quality", "max"), ("p50_ms_bs1", "min")]
    slow, fast, good = ({"trial_id": "slow", "quality": 0.5, "p50_ms_bs1": 2.0},
                        {"trial_id": "fast", "quality": 0.5, "p50_ms_bs1": 1.0},
                        {"trial_id": "good", "quality": 0.75, "p50_ms_bs1": 3.0})
    assert _better_row(fast, slow, objectives) and not _better_row(slow, fast, objectives)
    assert _better_row(good, fast, objectives) and not _better_row(fast, good, objectives)
    assert not _better_row(fast, dict(fast), objectives)
    assert pareto_front([slow, fast, good], objectives) == ["fast", "good"]
    # single objective: a tie keeps the first
    assert not _better_row(fast, slow, objectives[:1])
