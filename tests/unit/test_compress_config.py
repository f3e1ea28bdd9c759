"""CompressSpec validation (strict, dotted paths, smoke sizes) and the distillation task (pure)."""

import os

import pytest
import torch

from heygen_ray.config import SMOKE_OVERRIDES, SPEC_KINDS, CompressSpec, ConfigError, load_spec, spec_kind_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = os.path.join(REPO, "configs/compress/video_classifier.yaml")


def test_shipped_config_and_smoke_sizes_validate():
    assert spec_kind_for(CFG) is CompressSpec and SPEC_KINDS["compress"] is CompressSpec
    spec = load_spec(CompressSpec, CFG)
    assert spec.prune.ratio == 0.5 and spec.quantize.scheme == "int8_static" and spec.gate.max_drop == 0.01
    smoke = load_spec(CompressSpec, CFG, SMOKE_OVERRIDES["compress"])
    assert smoke.train.steps < spec.train.steps and smoke.teacher_steps < spec.teacher_steps
    assert smoke.fingerprint() != spec.fingerprint()  # the recipe hash follows the spec
    assert "pruned_distilled_compiled" in spec.measure.variants  # every reference variant unless told otherwise


@pytest.mark.parametrize("override,where", [
    ("prune.ratoi=0.3", "prune.ratoi"),
    ("prune.ratio=1.0", "prune.ratio"),
    ("distill.alpha=1.5", "distill.alpha"),
    ("quantize.scheme=int4", "quantize.scheme"),
    ("prune.round_to=8.0", "prune.round_to"),  # a float where an int is wanted (a sweep sampler) fails
    ("train.task=language_modeling", "train.task"),
    ("measure.variants=[teacher_bf16, pruned_distiled]", "measure.variants.1"),
])
def test_bad_values_fail_with_the_dotted_path(override, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_spec(CompressSpec, CFG, [override])


def test_distillation_task_uses_the_frozen_teacher_and_scores_on_labels():
    from heygen_ray.models import create_model
    from heygen_ray.train.tasks import DataInfo, DistillationTask, get_task

    torch.manual_seed(0)
    base = get_task("video_classification")
    teacher = create_model("conv_video_encoder_micro", num_classes=4)
    student = create_model("conv_video_encoder_micro", num_classes=4)
    batch = {"video": torch.randint(0, 255, (3, 8, 32, 32, 3), dtype=torch.uint8), "label": torch.tensor([0, 1, 2])}
    kd = DistillationTask(base, teacher, temperature=2.0, alpha=1.0)
    inputs, (labels, t_logits) = kd.inputs(batch)
    assert not t_logits.requires_grad and all(not p.requires_grad for p in teacher.parameters())
    assert torch.equal(labels, batch["label"])
    out = student(**inputs)
    loss = kd.loss(out, (labels, t_logits))
    loss.backward()
    assert student.head.weight.grad is not None and teacher.head.weight.grad is None
    # alpha = 1: matching the teacher's logits exactly gives zero loss; alpha = 0 is plain cross-entropy
    assert float(kd.loss(t_logits.clone(), (labels, t_logits))) == pytest.approx(0.0, abs=1e-6)
    ce = DistillationTask(base, teacher, alpha=0.0)
    assert float(ce.loss(out.detach(), (labels, t_logits))) == pytest.approx(float(base.loss(out.detach(), labels)), rel=1e-6)
    state = kd.new_metrics(DataInfo(num_classes=4))
    kd.update_metrics(state, out.detach(), (labels, t_logits))
    assert kd.compute_metrics(state)["samples"] == 3
