"""int8 outputs stay close to fp32 and the artifact is smaller; the safe artifact reloads with the
restricted loader; bf16 is always available; every variant exports to .pt2; measurement figures."""

import os

import pytest
import torch

from heygen_ray.compress import measure, quantize
from heygen_ray.models import create_model

# one intra-op thread, as a 1-CPU Ray worker has: restored after the module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vt():
    torch.manual_seed(0)
    return create_model("video_transformer_micro").eval()


def test_int8_dynamic_close_to_fp32_smaller_and_reloads_weights_only(tmp_path):
    m = _vt()
    x = m.example_inputs(4)
    q = quantize.quantize_int8_dynamic(_vt())  # the same weights (same seed), quantized
    assert quantize.int8_linear_count(q) == 8  # qkv, proj, fc1, fc2 in 2 blocks; the classifier stays fp32
    with torch.inference_mode():
        ref, out = m(**x), q(**x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.05
    fp32 = tmp_path / "fp32.pt"
    torch.save(m.state_dict(), fp32)
    path = quantize.save_int8_dynamic(q, str(tmp_path / "int8.pt"))
    assert os.path.getsize(path) < 0.6 * os.path.getsize(fp32)
    again = quantize.load_int8_dynamic(create_model("video_transformer_micro"), path)  # torch.load(weights_only=True)
    with torch.inference_mode():
        assert torch.allclose(again(**x), out)


@pytest.mark.slow
def test_int8_static_pt2e_close_to_fp32_after_calibration(tmp_path):
    m = _vt()
    x = m.example_inputs(4)
    calib = [m.example_inputs(4) for _ in range(3)]
    qm = quantize.quantize_int8_static(m, x, calib)
    fast = quantize.compile_frozen(qm)
    with torch.inference_mode():
        ref, out = m(**x), fast(**x)
        assert fast(video=x["video"][:1]).shape == (1, m.num_classes)  # dynamic batch
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.1
    path = quantize.export_pt2(qm, x, str(tmp_path / "q.pt2"))
    # a fresh process (as a Serve replica is) loads the int8 graph: its quantized_decomposed ops are
    # registered by load_pt2, not by torch itself
    import subprocess
    import sys

    code = ("import torch; from heygen_ray.compress import quantize as q; m = q.load_pt2(%r); m.eval(); "
            "print(tuple(m(video=torch.zeros(3, 3, 8, 32, 32)).shape))" % path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == f"(3, {m.num_classes})", r.stderr[-2000:]


def test_bf16_variant_channels_last_for_conv3d_and_close():
    m = create_model("conv_video_encoder_micro").eval()
    x = m.example_inputs(2)
    b = quantize.to_bf16(m)
    assert b.memory_format == torch.channels_last_3d and next(b.model.parameters()).dtype == torch.bfloat16
    assert b.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        ref, out = m(**x), b(**x)
    assert out.dtype == torch.float32 and float((out - ref).abs().max() / ref.abs().max()) < 0.05


def test_export_pt2_with_dynamic_batch(tmp_path):
    m = _vt()
    x = m.example_inputs(3)
    path = quantize.export_pt2(quantize.to_bf16(m), x, str(tmp_path / "m.pt2"))
    ep = torch.export.load(path)
    out = ep.module()(video=x["video"][:1].to(torch.bfloat16))
    assert out.shape == (1, m.num_classes)


def test_measure_reports_every_figure(tmp_path):
    from heygen_ray.train.tasks import DataInfo, get_task

    task, info = get_task("video_classification"), DataInfo(num_classes=16)
    m = create_model("conv_video_encoder_micro").eval()
    batches = [{"video": torch.randint(0, 255, (5, 8, 32, 32, 3), dtype=torch.uint8), "label": torch.arange(5)}]
    metrics = measure.evaluate(m, batches, task, info, batch_size=8)  # padded 5 -> 8, scored on 5
    assert metrics["samples"] == 5 and 0.0 <= metrics["accuracy"] <= 1.0
    x = {k: v for k, v in task.inputs(batches[0])[0].items()}
    lat = measure.latencies({"a": m, "b": quantize.to_bf16(m)},
                            {1: {"video": x["video"][:1]}, 8: {"video": x["video"][:1].repeat(8, 1, 1, 1, 1)}},
                            rounds=1, iters=2, warmup=1)
    for row in lat.values():
        for key in ("p50_ms_bs1", "p95_ms_bs1", "p50_ms_bs8", "p95_ms_bs8", "throughput_bs8"):
            assert row[key] > 0
        assert row["p95_ms_bs8"] >= row["p50_ms_bs8"]
    assert measure.flops_per_sample(m, x) == m.flops_per_sample()
    torch.save(m.state_dict(), tmp_path / "w.pt")
    assert measure.file_size(str(tmp_path)) == os.path.getsize(tmp_path / "w.pt")


@pytest.mark.slow
def test_int8_qat_fine_tune_learns_under_fake_quantization_and_converts(tmp_path):
    """A QAT fine-tune on one fixed batch with fresh labels: the converted int8 model fits those labels
    better than the model it started from (the training happened, through the fake-quantize
    observers, and survived conversion); the result compiles, takes any batch size and exports."""
    import torch.nn.functional as F

    m = _vt()
    x = m.example_inputs(8)
    labels = torch.arange(8) % m.num_classes
    with torch.no_grad():
        before = F.cross_entropy(m(**x), labels).item()
    qm = quantize.quantize_int8_qat(m, x, [(x, labels)], lambda out, y: F.cross_entropy(out, y), steps=30, lr=3e-3)
    assert any("quantize_per_tensor" in str(n.target) for n in qm.graph.nodes)  # real q/dq, not fake-quant
    fast = quantize.compile_frozen(qm)
    with torch.inference_mode():
        after = F.cross_entropy(fast(**x), labels).item()
        assert fast(video=x["video"][:1]).shape == (1, m.num_classes)
    assert after < 0.5 * before, (before, after)
    assert os.path.getsize(quantize.export_pt2(qm, x, str(tmp_path / "qat.pt2"))) > 0
    with pytest.raises(ValueError, match="at least one"):
        quantize.quantize_int8_qat(m, x, [], lambda out, y: out.sum(), steps=1)


class _ConvNet(torch.nn.Module):
    """conv -> relu -> flatten -> linear: two compute operators per call, the rest overhead."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.fc = torch.nn.Linear(width * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_time_breakdown_splits_compute_from_overhead():
    """The shares partition the profiled time; a wide model at batch 8 spends most of it in the compute
    operators, which are named; every operator of the forward is counted."""
    torch.manual_seed(0)
    small = measure.time_breakdown(_ConvNet(2).eval(), {"x": torch.randn(1, 3, 16, 16)}, iters=10)
    big = measure.time_breakdown(_ConvNet(256).eval(), {"x": torch.randn(8, 3, 16, 16)}, iters=10)
    for b in (small, big):
        assert b["compute_share"] + b["other_ops_share"] + b["outside_ops_share"] == pytest.approx(1.0, abs=0.01)
        assert b["wall_ms"] > 0 and b["profiled_ms"] > 0 and b["op_calls_per_forward"] >= 4  # conv, relu, flatten, linear
        assert len(b["top_ops"]) <= 5 and all("::" in o["op"] for o in b["top_ops"])
    # the conv and the 65,536-input linear hold the time (which one leads varies by machine)
    assert big["compute_share"] > 0.5 and any("conv" in o["op"] for o in big["top_ops"])
    assert any(k in big["top_ops"][0]["op"].split("::", 1)[1] for k in measure.COMPUTE_OPS)
