"""precision: auto: the decision from the CPU flags and the probe, and the probe itself."""

import pytest
import torch

from heygen_ray.models import create_model
from heygen_ray.train.precision import (
    MIN_SPEEDUP,
    PrecisionChoice,
    amp_dtype,
    bf16_cpu_support,
    cpu_flags,
    probe_bf16_speedup,
    read_choice,
    resolve_precision,
    write_choice,
)

CPU = torch.device("cpu")


def never(*_):  # a probe that must not run
    raise AssertionError("probed")


def test_a_cpu_without_bf16_hardware_trains_fp32_without_probing():
    choice = resolve_precision("auto", CPU, flags=frozenset({"avx2", "fma"}), probe=never)
    assert choice.precision == "fp32" and "amx_bf16" in choice.reason and choice.bf16_speedup is None
    assert choice.to_params()["precision_resolved"] == "fp32" and choice.to_params()["precision_requested"] == "auto"


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_with_bf16_hardware_the_probe_decides(flag):
    fast = resolve_precision("auto", CPU, flags=frozenset({flag}), probe=lambda: 2.4)
    assert fast.precision == "bf16" and fast.bf16_speedup == 2.4 and flag in fast.reason
    slow = resolve_precision("auto", CPU, flags=frozenset({flag}), probe=lambda: MIN_SPEEDUP - 0.05)
    assert slow.precision == "fp32" and "only" in slow.reason


def test_an_explicit_precision_is_kept_as_is():
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, CPU, flags=frozenset(), probe=never).precision == p
    assert amp_dtype("fp32") is None and amp_dtype("bf16") is torch.bfloat16 and amp_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="resolve"):
        amp_dtype("auto")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\nbogus: 1\n")
    flags = cpu_flags(str(f))
    assert {"avx2", "amx_bf16"} <= flags and bf16_cpu_support(flags) == "amx_bf16"
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_the_probe_times_a_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = create_model("cnn_video_micro").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = model.example_inputs(2)
    speedup = probe_bf16_speedup(model, inputs, lambda out: out.float().sum())
    assert speedup > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert all(p.grad is None for p in model.parameters())


def test_a_recorded_choice_is_kept_by_later_attempts_of_the_run(tmp_path, monkeypatch):
    """A retried or resumed attempt takes the run's first choice instead of probing again: the probe
    can measure differently the second time (MLflow then refuses the changed run param, and the
    checkpoints were made in the first precision)."""
    from heygen_ray.config import TrainSpec
    from heygen_ray.train import precision
    from heygen_ray.train.tasks import DataInfo

    record = str(tmp_path / "run" / "precision.json")
    assert read_choice(record, "auto") is None  # nothing recorded yet
    calls = []
    answers = iter([PrecisionChoice("bf16", "auto", "probe said 1.4x", 1.4), PrecisionChoice("fp32", "auto", "0.9x", 0.9)])
    monkeypatch.setattr(precision, "_resolve", lambda *a: calls.append(1) or next(answers))
    spec = TrainSpec.from_dict({"name": "p", "task": "video_classification", "precision": "auto"})
    info = DataInfo(clip_frames=8, height=32, width=32, num_classes=16)
    first = precision.choose_precision(spec, None, None, info, torch.device("cpu"), 1, record)
    again = precision.choose_precision(spec, None, None, info, torch.device("cpu"), 1, record)
    assert first == again == PrecisionChoice("bf16", "auto", "probe said 1.4x", 1.4) and len(calls) == 1
    assert read_choice(record, "auto") == first
    assert read_choice(record, "fp32") is None  # recorded for another request: decided afresh
    (tmp_path / "bad.json").write_text("{not json")
    assert read_choice(str(tmp_path / "bad.json"), "auto") is None
    write_choice(record, PrecisionChoice("fp32", "fp32", "set in the config"))
    assert read_choice(record, "fp32").reason == "set in the config"


def test_the_probe_runs_once_per_host_and_model_shape(tmp_path, monkeypatch):
    """Two runs of the same model at the same batch take the first probe's answer (a second probe on a
    busy machine can land on the other side of MIN_SPEEDUP); another batch size is probed anew. The
    CPU flags are set to a bf16-capable CPU so the probe path runs on any machine."""
    from heygen_ray.config import TrainSpec
    from heygen_ray.train import precision
    from heygen_ray.train.tasks import DataInfo, get_task

    monkeypatch.setenv("HEYGEN_RAY_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    speedups = iter([1.3, 0.8, 0.7])
    probes = []
    monkeypatch.setattr(precision, "probe_bf16_speedup", lambda *a: probes.append(1) or next(speedups))
    task, info = get_task("video_classification"), DataInfo(clip_frames=4, height=16, width=16, num_classes=4)
    model = create_model("cnn_video_micro", num_classes=4, image_size=16)

    def choose(batch):
        spec = TrainSpec.from_dict({"name": "p", "task": "video_classification", "precision": "auto", "batch_size": batch})
        return precision.choose_precision(spec, model, task, info, CPU, 1)

    first, second = choose(2), choose(2)
    assert first.precision == second.precision == "bf16" and second.bf16_speedup == 1.3 and len(probes) == 1
    assert "cached" not in first.reason and "probe cached on this host" in second.reason
    other = choose(3)
    assert other.precision == "fp32" and other.bf16_speedup == 0.8 and len(probes) == 2
