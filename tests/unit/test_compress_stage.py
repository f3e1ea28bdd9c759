"""The compression stage's steps on a micro model, without Ray or MLflow: each step returns Variant
records (saved where the stage saves them, with their parent), the measuring/gating/report steps
fill and write the report rows, and CompressResult round-trips through results.json."""

import json
import os

import pytest
import torch

from heygen_ray.compress import stage
from heygen_ray.compress.quantize import CastInputs
from heygen_ray.config import CompressSpec, GateSpec, MeasureSpec, PruneSpec
from heygen_ray.models import create_model
from heygen_ray.models.architecture import architecture
from heygen_ray.train.tasks import DataInfo, get_task

torch.set_num_threads(1)
MODEL = "conv_video_encoder_micro"


def _data(n_classes=4, rows=8):
    """HeldOutData of random clips shaped for the micro model (8 frames of 32x32)."""
    torch.manual_seed(0)
    task = get_task("video_classification")
    info = DataInfo(num_classes=n_classes, clip_frames=8, height=32, width=32)

    def batch():
        return {"video": torch.randint(0, 256, (rows, 8, 32, 32, 3), dtype=torch.uint8),
                "label": torch.arange(rows) % n_classes}

    evals, train = [batch(), batch()], [batch(), batch()]
    example = task.inputs(evals[0])[0]
    return stage.HeldOutData(task, info, evals, train, [task.inputs(b)[0] for b in train], example,
                             stage._fingerprint(train))


@pytest.fixture
def chain(tmp_path):
    ws = stage.Workspace(str(tmp_path / "variants"), MODEL, {"num_classes": 4})
    torch.manual_seed(0)
    teacher = ws.saved(stage.TEACHER, create_model(MODEL, num_classes=4).eval())
    return ws, teacher, _data()


def test_the_teacher_variant_runs_from_its_saved_safetensors(chain):
    ws, teacher, _ = chain
    assert teacher.artifact == os.path.join(ws.path(stage.TEACHER), "artifacts", "model.safetensors")
    assert os.path.isfile(teacher.artifact) and teacher.model_dir == ws.path(stage.TEACHER)
    assert teacher.runnable is teacher.source and teacher.parent is None and teacher.architecture is None
    assert not teacher.is_int8 and teacher.registered_module() is teacher.source


def test_prune_step_saves_a_smaller_pruned_variant_that_reloads_with_its_widths(chain):
    from heygen_ray.tracking import load_model

    ws, teacher, data = chain
    pruned, report = stage.prune_step(teacher, PruneSpec(ratio=0.5, importance="l1"), 0, data, ws)
    assert pruned.name == "pruned" and pruned.parent == stage.TEACHER and pruned.model_dir == ws.path("pruned")
    assert report["method"] == "structured" and report["params_after"] < report["params_before"]
    assert sum(p.numel() for p in pruned.source.parameters()) == report["params_after"]
    assert sum(p.numel() for p in teacher.source.parameters()) == report["params_before"]  # the teacher is untouched
    assert pruned.architecture == architecture(pruned.source)  # the pruned widths travel with the variant
    reloaded = load_model(pruned.model_dir)
    with torch.inference_mode():
        assert torch.equal(reloaded(**data.example), pruned.runnable(**data.example))


def test_prune_step_disabled_keeps_the_teachers_shapes(chain):
    ws, teacher, data = chain
    pruned, report = stage.prune_step(teacher, PruneSpec(enabled=False), 0, data, ws)
    assert report == {"method": "none"} and pruned.source is not teacher.source
    assert {k: v.shape for k, v in pruned.source.state_dict().items()} == \
        {k: v.shape for k, v in teacher.source.state_dict().items()}


def test_reference_variants_follow_measure_variants_in_report_order(chain):
    ws, teacher, data = chain
    pruned, _ = stage.prune_step(teacher, PruneSpec(ratio=0.5), 0, data, ws)
    out = stage.reference_variants(teacher, pruned, pruned, ["pruned", "teacher_bf16"], ws)
    assert [v.name for v in out] == [stage.TEACHER, "teacher_bf16", "pruned"]
    bf16 = out[1]
    assert isinstance(bf16.runnable, CastInputs) and bf16.source is teacher.source and bf16.parent == stage.TEACHER
    assert bf16.registered_module() is bf16.runnable.model
    assert next(bf16.registered_module().parameters()).dtype == torch.bfloat16
    assert os.path.isfile(bf16.artifact) and bf16.model_dir == ws.path("teacher_bf16")
    assert stage.reference_variants(teacher, pruned, pruned, [], ws) == [teacher]


def test_int8_dynamic_step_writes_its_int8_file_and_registers_its_fp32_source(chain):
    ws, teacher, data = chain
    spec = CompressSpec.from_dict({"quantize": {"scheme": "int8_dynamic"}})
    final = stage.quantize_step(teacher, teacher, spec, None, data, ws)
    assert final.name == "pruned_distilled_int8_dynamic" and final.is_int8 and final.parent == stage.TEACHER
    assert final.artifact == ws.path(final.name, "int8_dynamic.pt") and os.path.isfile(final.artifact)
    assert final.model_dir is None and final.registered_module() is final.source is teacher.source
    assert stage.runnable_module(final.runnable) is not teacher.source  # quantized a copy


def test_unstructured_control_step_zeroes_a_copy_of_the_teacher(chain):
    ws, teacher, _ = chain
    ctrl = stage.unstructured_control_step(teacher, 0.5, ws)
    assert ctrl.name == "unstructured_control" and ctrl.parent == stage.TEACHER and os.path.isfile(ctrl.artifact)
    zeros = sum(int((p == 0).sum()) for p in ctrl.source.parameters())
    assert zeros > 0.3 * sum(p.numel() for p in ctrl.source.parameters())
    assert all(int((p == 0).sum()) < p.numel() // 2 for p in teacher.source.parameters() if p.dim() > 1)


def test_measure_gate_and_report_steps_fill_and_write_the_rows(chain, tmp_path):
    ws, teacher, data = chain
    pruned, _ = stage.prune_step(teacher, PruneSpec(ratio=0.5), 0, data, ws)
    variants = stage.reference_variants(teacher, pruned, pruned, ["pruned", "teacher_bf16"], ws)
    close = stage.measure_step(variants, pruned, variants[-1], MeasureSpec(rounds=1, iters=1, breakdown=True), data)
    assert close["top1_agreement"] == 1.0 and close["max_rel_error"] == 0.0  # a variant against itself
    rows = [v.row for v in variants]
    assert [r["variant"] for r in rows] == [stage.TEACHER, "teacher_bf16", "pruned"]
    # the batch-1 profile of the teacher and of the final variant (here "pruned"), not of the others
    assert [r["variant"] for r in rows if "batch1_breakdown" in r] == [stage.TEACHER, "pruned"]
    assert all(r["batch1_breakdown"]["op_calls_per_forward"] > 0 for r in rows if "batch1_breakdown" in r)
    for v in variants:
        assert v.row["artifact"] == v.artifact and v.row["size_bytes"] == os.path.getsize(v.artifact)
        assert v.row["metrics"]["samples"] == 16 and v.row["p50_ms_bs1"] > 0 and v.row["p50_ms_bs8"] > 0
    assert rows[2]["params"] < rows[0]["params"] and rows[2]["flops_per_sample"] < rows[0]["flops_per_sample"]
    assert rows[1]["flops_per_sample"] == rows[0]["flops_per_sample"]  # bf16: the same architecture
    metric, alias = stage.gate_step(variants, GateSpec(max_drop=1.0), data.task)
    assert metric == "accuracy" and alias == "pruned"  # the only candidate, and everything passes
    assert rows[0]["speedup_bs1_vs_fp32"] == 1.0 and rows[1]["speedup_bs1_vs_bf16"] == 1.0
    table, svg = stage.report_step(variants, metric, str(tmp_path))
    assert open(tmp_path / "report.md").read() == table and "| pruned |" in table
    assert open(tmp_path / "accuracy_vs_latency.svg").read() == svg


def _result(**over):
    d = dict(name="c", model=MODEL, teacher_uri="/t", lineage={"parent_uri": "/t", "model_name": MODEL, "overrides": {}},
             recipe="abc", calibration_fingerprint="f00", metric="accuracy", prune={"method": "none"}, distill={},
             final_variant="pruned_distilled_int8_static", int8_vs_fp32_student={"max_rel_error": 0.1, "top1_agreement": 1.0},
             variants=[{"variant": "teacher_fp32", "quality": 0.5}, {"variant": "pruned_distilled_int8_static", "quality": 0.5}],
             exported_pt2={}, alias="compressed", alias_variant=None, eval_rows=16, mlflow_run_id=None, tracking_uri=None)
    d.update(over)
    return stage.CompressResult(**d)


def test_compress_result_round_trips_and_results_json_holds_all_but_its_own_path(tmp_path):
    res = _result(versions={"teacher_fp32": "1"}, seconds=1.5)
    res.results_path = stage.write_results(res, str(tmp_path))
    assert res.results_path == str(tmp_path / "results.json")
    on_disk = json.load(open(res.results_path))
    full = res.to_dict()
    assert list(full)[-3:] == ["versions", "seconds", "results_path"]
    assert on_disk == {k: v for k, v in full.items() if k != "results_path"}
    assert list(on_disk) == list(full)[:-1]  # the key order of results.json
    assert stage.CompressResult.from_dict(on_disk) == _result(versions={"teacher_fp32": "1"}, seconds=1.5)
    assert stage.CompressResult.from_dict(json.loads(json.dumps(full))) == res
    assert stage.CompressResult.from_dict(dict(full, added_later=1)) == res
    assert res.row("teacher_fp32")["quality"] == 0.5
    with pytest.raises(KeyError, match="nope"):
        res.row("nope")
