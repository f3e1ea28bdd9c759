"""Losses and metrics against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from heygen_ray.losses import (
    DistillationLoss,
    PatchDiscriminator3D,
    VideoGenerationLoss,
    aligned_target,
    best_shift,
    clip_background,
    discriminator_hinge_loss,
    dominant_colour,
    foreground_mask,
    frequency_loss,
    generator_hinge_loss,
    image_gradient_loss,
    kd_loss,
    object_centroid,
    object_centroids,
    psnr,
    shift_clips,
    shift_frames,
    ssim,
    temporal_consistency_loss,
    trajectory_loss,
    trajectory_pixels,
    weighted_pixel_loss,
)


def hand_kl(teacher_logits, student_logits, temperature=1.0):
    """KL(p || q) per row with p = softmax(teacher / T), q = softmax(student / T), batch mean."""
    total = 0.0
    for t_row, s_row in zip(teacher_logits.tolist(), student_logits.tolist()):
        zt = [math.exp(v / temperature) for v in t_row]
        zs = [math.exp(v / temperature) for v in s_row]
        p = [v / sum(zt) for v in zt]
        q = [v / sum(zs) for v in zs]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(teacher_logits)


def hand_ce(logits, labels):
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        total += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    return total / len(labels)


STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
TEACHER = torch.tensor([[2.0, 0.5, 0.0], [1.0, 1.0, 1.5]])
LABELS = torch.tensor([1, 2])


def test_kd_at_temperature_one_is_the_kl_divergence():
    loss, parts = DistillationLoss(temperature=1.0, alpha=1.0)(STUDENT, TEACHER)
    assert loss.item() == pytest.approx(hand_kl(TEACHER, STUDENT), rel=1e-6)
    assert set(parts) == {"kd", "total"}


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_kd_is_scaled_by_temperature_squared(temperature):
    loss, _ = DistillationLoss(temperature=temperature, alpha=1.0)(STUDENT, TEACHER)
    assert loss.item() == pytest.approx(temperature**2 * hand_kl(TEACHER, STUDENT, temperature), rel=1e-6)


def test_alpha_mixes_soft_and_hard_losses():
    loss, parts = DistillationLoss(temperature=3.0, alpha=0.3)(STUDENT, TEACHER, LABELS)
    expected = 0.3 * 9.0 * hand_kl(TEACHER, STUDENT, 3.0) + 0.7 * hand_ce(STUDENT, LABELS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["hard"].item() == pytest.approx(hand_ce(STUDENT, LABELS), rel=1e-6)
    assert not parts["total"].requires_grad


def test_distillation_on_sequences_skips_ignored_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100], [0, 4, 3, -100]])
    loss, parts = DistillationLoss(temperature=1.0, alpha=0.5)(s, t, labels)
    keep = labels.reshape(-1) != -100
    kd = hand_kl(t.reshape(-1, 5)[keep], s.reshape(-1, 5)[keep])
    ce = hand_ce(s.reshape(-1, 5)[keep], labels.reshape(-1)[keep])
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-5)


def test_teacher_gets_no_gradient_and_student_does():
    s, t = STUDENT.clone().requires_grad_(), TEACHER.clone().requires_grad_()
    kd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_hidden_state_term_with_learned_projection():
    torch.manual_seed(0)
    crit = DistillationLoss(temperature=1.0, alpha=1.0, hidden_loss_weight=0.5,
                            student_hidden_dimensions=4, teacher_hidden_dimensions=6)
    hs, ht = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 6)
    loss, parts = crit(STUDENT, TEACHER, student_hidden=hs, teacher_hidden=ht)
    hidden = F.mse_loss(hs @ crit.projection.weight.T + crit.projection.bias, ht)
    assert parts["hidden"].item() == pytest.approx(hidden.item(), rel=1e-6)
    assert loss.item() == pytest.approx(hand_kl(TEACHER, STUDENT) + 0.5 * hidden.item(), rel=1e-5)
    loss.backward()
    assert crit.projection.weight.grad.abs().sum() > 0 and hs.grad.abs().sum() > 0
    assert isinstance(DistillationLoss(student_hidden_dimensions=4, teacher_hidden_dimensions=4).projection,
                      torch.nn.Identity)


def test_distillation_argument_errors():
    with pytest.raises(ValueError, match="labels"):
        DistillationLoss(alpha=0.5)(STUDENT, TEACHER)
    with pytest.raises(ValueError, match="hidden"):
        DistillationLoss(alpha=1.0, hidden_loss_weight=1.0)(STUDENT, TEACHER)
    with pytest.raises(ValueError):
        DistillationLoss(temperature=0.0)


# -- SSIM / PSNR ---------------------------------------------------------------------------------
def test_ssim_of_identical_videos_is_one():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 24, 24) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, x, reduction="none").shape == (2,)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert ssim(x, noisy).item() < 0.9


@pytest.mark.parametrize("a,b", [(0.2, -0.4), (0.5, 0.5), (-1.0, 1.0)])
def test_ssim_of_constant_images_follows_the_formula(a, b):
    x, y = torch.full((1, 1, 2, 16, 16), a), torch.full((1, 1, 2, 16, 16), b)
    c1 = (0.01 * 2.0) ** 2  # data_range 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances 0: the contrast-structure term is 1
    assert ssim(x, y, data_range=2.0).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_accepts_images_and_small_frames():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)  # smaller than the 11-pixel window: the window shrinks
    assert ssim(x, x, data_range=1.0).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, torch.rand(2, 3, 8, 8), data_range=1.0).item() < 0.5


def test_psnr_by_hand():
    x, y = torch.zeros(2, 3, 2, 4, 4), torch.full((2, 3, 2, 4, 4), 0.5)
    assert psnr(x, y, data_range=2.0).item() == pytest.approx(10 * math.log10(4 / 0.25), rel=1e-6)
    y[1] = 0.1  # per-sample PSNRs, then the mean
    expected = (10 * math.log10(4 / 0.25) + 10 * math.log10(4 / 0.01)) / 2
    assert psnr(x, y).item() == pytest.approx(expected, rel=1e-5)
    assert psnr(x, x).item() == pytest.approx(10 * math.log10(4 / 1e-10), rel=1e-5)


# -- video loss terms ----------------------------------------------------------------------------
def test_temporal_consistency_by_hand():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 5, 4, 4)
    assert temporal_consistency_loss(target + 0.7, target).item() < 1e-6  # same motion, shifted colours
    assert temporal_consistency_loss(target.flip(2), target).item() > 0.5
    pred = torch.zeros(1, 1, 3, 1, 2)
    tgt = torch.tensor([0.0, 0.0, 1.0, 3.0, 1.0, 1.0]).view(1, 1, 3, 1, 2)  # frames: [0,0], [1,3], [1,1]
    # diffs of tgt: [1,3], [0,-2]; of pred: 0 -> mean |.| = (1 + 3 + 0 + 2) / 4
    assert temporal_consistency_loss(pred, tgt).item() == pytest.approx(1.5)
    assert temporal_consistency_loss(pred[:, :, :1], tgt[:, :, :1]).item() == 0.0


def test_image_gradient_loss_by_hand():
    pred = torch.zeros(1, 1, 1, 2, 2)
    tgt = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 1, 2, 2)
    # horizontal diffs of tgt: 1, 2 -> mean 1.5; vertical: 2, 3 -> mean 2.5
    assert image_gradient_loss(pred, tgt).item() == pytest.approx(4.0)


def test_frequency_loss_is_zero_only_for_equal_videos():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 8, 8)
    assert frequency_loss(x, x).item() == 0.0
    assert frequency_loss(x, x.flip(2)).item() > 0.1


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert generator_hinge_loss(fake).item() == pytest.approx(1.0 / 3)


def test_video_generation_loss_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    pred = (target + 0.2 * torch.randn_like(target)).clamp(-1, 1).requires_grad_()
    crit = VideoGenerationLoss(pixel_loss_weight=1.0, perceptual_loss_weight=0.3, temporal_consistency_weight=0.5,
                               frequency_loss_weight=0.1)
    assert crit.discriminator is None
    total, parts = crit(pred, target)
    p = pred.detach()
    assert parts["pixel"].item() == pytest.approx((p - target).abs().mean().item(), rel=1e-6)
    assert parts["ssim"].item() == pytest.approx(ssim(p, target).item(), rel=1e-6)
    assert parts["perceptual"].item() == pytest.approx(1 - parts["ssim"].item() + parts["gradient"].item(), rel=1e-6)
    expected = parts["pixel"] + 0.3 * parts["perceptual"] + 0.5 * parts["temporal"] + 0.1 * parts["frequency"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "adversarial" not in parts and all(not v.requires_grad for v in parts.values())
    total.backward()
    assert pred.grad.abs().sum() > 0
    mse_total, mse_parts = VideoGenerationLoss(pixel_loss="mse", perceptual_loss_weight=0.0,
                                               temporal_consistency_weight=0.0)(p, target)
    assert mse_total.item() == pytest.approx(((p - target) ** 2).mean().item(), rel=1e-6)


def test_adversarial_term_and_discriminator_step():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    pred = torch.rand(2, 3, 8, 32, 32).mul(2).sub(1).requires_grad_()
    crit = VideoGenerationLoss(adversarial_loss_weight=0.1, adversarial_start_step=10)
    disc = crit.discriminator
    assert isinstance(disc, PatchDiscriminator3D)
    assert parametrize.is_parametrized(disc.net[0], "weight")  # spectral norm
    logits = disc(target)
    assert logits.shape == (2, 1, 4, 4, 4)

    _, early = crit(pred, target, step=5)
    assert "adversarial" not in early  # before adversarial_start_step
    total, parts = crit(pred, target, step=10)
    assert "adversarial" in parts
    base = parts["pixel"] + 0.2 * parts["perceptual"] + 0.5 * parts["temporal"]
    assert total.item() == pytest.approx((base + 0.1 * parts["adversarial"]).item(), rel=1e-5)
    total.backward()
    assert pred.grad.abs().sum() > 0

    d_loss, d_parts = crit.discriminator_loss(pred, target)
    d_loss.backward()
    assert disc.net[0].parametrizations.weight.original.grad.abs().sum() > 0
    assert d_parts["discriminator"].item() == pytest.approx(d_loss.item())
    with pytest.raises(RuntimeError):
        VideoGenerationLoss().discriminator_loss(pred, target)


def test_similarity_preserving_loss_against_hand_computed_value():
    """Tung & Mori (2019) on batch-centred features: G = F F^T, rows L2-normalised,
    loss = ||G_s - G_t||_F^2 / B^2."""
    from heygen_ray.losses import similarity_preserving_loss

    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # batch mean 0 already
    ft = torch.tensor([[1.0], [-1.0], [0.0]])  # the teacher is 1 wide; mean 0 already
    # G_s = [[1,0,-1],[0,1,-1],[-1,-1,2]], row norms sqrt2, sqrt2, sqrt6
    # G_t = [[1,-1,0],[-1,1,0],[0,0,0]], row norms sqrt2, sqrt2, 0 (a zero row stays 0)
    # rows of G_s - G_t (normalised): [0, r, -r], [r, 0, -r], [-1, -1, 2]/sqrt6 with r = 1/sqrt2
    # squared sums 1, 1, 1 -> 3 / B^2 = 1/3
    assert similarity_preserving_loss(fs, ft).item() == pytest.approx(1 / 3, rel=1e-6)
    # centred: a constant offset changes nothing; (B, N, D) features are flattened per sample
    assert similarity_preserving_loss(fs + 5.0, ft - 2.0).item() == pytest.approx(1 / 3, rel=1e-6)
    assert similarity_preserving_loss(fs.reshape(3, 1, 2), ft).item() == pytest.approx(1 / 3, rel=1e-6)
    # width-independent: the same features padded with zeros (another width), scaled, agree exactly
    assert similarity_preserving_loss(3.0 * torch.cat([fs, torch.zeros(3, 5)], 1), fs).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_loss_similarity_hidden_mode_needs_no_projection():
    from heygen_ray.losses import similarity_preserving_loss

    crit = DistillationLoss(temperature=1.0, alpha=1.0, hidden_loss_weight=2.0, hidden_loss="similarity")
    assert isinstance(crit.projection, torch.nn.Identity) and not list(crit.parameters())
    hs, ht = torch.randn(4, 8), torch.randn(4, 16)
    loss, parts = crit(STUDENT, TEACHER, student_hidden=hs, teacher_hidden=ht)
    assert parts["hidden"].item() == pytest.approx(similarity_preserving_loss(hs, ht).item())
    assert loss.item() == pytest.approx(parts["kd"].item() + 2.0 * parts["hidden"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="hidden_loss"):
        DistillationLoss(hidden_loss="cosine")


def square_clip(x0: int, y0: int, size: int = 5, frames: int = 3, bg: float = -0.6, fg=(0.8, -0.2, 0.1)) -> torch.Tensor:
    """(1, 3, T, 32, 32): a square of ``size`` at (x0 + t, y0) on a plain background."""
    clip = torch.full((1, 3, frames, 32, 32), bg)
    for t in range(frames):
        for c, v in enumerate(fg):
            clip[0, c, t, y0:y0 + size, x0 + t:x0 + t + size] = v
    return clip


def test_background_foreground_and_centroid_of_a_clip():
    clip = square_clip(10, 6)
    assert clip_background(clip).flatten().tolist() == pytest.approx([-0.6] * 3)
    mask = foreground_mask(clip)
    assert mask.shape == (1, 1, 3, 32, 32) and mask.sum() == 3 * 25
    assert mask[0, 0, 1, 6:11, 11:16].all()
    # centroid: x = 10 + t + 2 averaged over t = 0..2 -> 13; y = 6 + 2 = 8
    assert object_centroid(clip)[0].tolist() == pytest.approx([13.0, 8.0])


def test_shift_clips_moves_each_clip_and_repeats_the_edges():
    torch.manual_seed(0)
    v = torch.randn(2, 3, 2, 8, 8)
    out = shift_clips(v, torch.tensor([2, -1]), torch.tensor([1, 0]))
    torch.testing.assert_close(out[0, :, :, 1:, 2:], v[0, :, :, :-1, :-2])  # right 2, down 1
    torch.testing.assert_close(out[0, :, :, 0, 2:], v[0, :, :, 0, :-2])  # the top row repeats
    torch.testing.assert_close(out[0, :, :, 1:, 0], v[0, :, :, :-1, 0])  # the left column repeats
    torch.testing.assert_close(out[1, :, :, :, :-1], v[1, :, :, :, 1:])  # left 1
    torch.testing.assert_close(out[1, :, :, :, -1], v[1, :, :, :, -1])


def test_weighted_pixel_loss_counts_the_foreground_more():
    target = square_clip(10, 6)
    pred = torch.full_like(target, -0.6)  # the background only: every error is on the object
    err = (pred - target) ** 2
    assert weighted_pixel_loss(pred, target, 0.0).item() == pytest.approx(err.mean().item())
    w = 1 + 4.0 * foreground_mask(target)
    expected = (err * w).sum() / w.expand_as(err).sum()
    assert weighted_pixel_loss(pred, target, 4.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert weighted_pixel_loss(pred, target, 4.0) > weighted_pixel_loss(pred, target, 0.0)
    assert weighted_pixel_loss(pred, target, 0.0, kind="l1").item() == pytest.approx((pred - target).abs().mean().item())


def test_aligned_pixel_loss_forgives_where_the_object_is_but_not_what_it_is():
    """The caption leaves an object's exact place open: drawn right but 3 pixels off, the aligned loss
    is zero where the plain one is not; drawn in the wrong colour, both see it."""
    target = square_clip(10, 6)
    moved = square_clip(13, 4)
    assert torch.equal(aligned_target(moved, target), moved)
    crit = VideoGenerationLoss(pixel_loss="mse", pixel_loss_weight=0.0, aligned_pixel_loss_weight=1.0,
                               perceptual_loss_weight=0.0, temporal_consistency_weight=0.0, foreground_weight=3.0)
    total, parts = crit(moved, target)
    assert total.item() == pytest.approx(0.0, abs=1e-7) and parts["aligned_pixel"].item() == pytest.approx(0.0, abs=1e-7)
    assert VideoGenerationLoss(pixel_loss="mse", perceptual_loss_weight=0.0, temporal_consistency_weight=0.0)(moved, target)[0] > 0.01
    recoloured = square_clip(13, 4, fg=(-0.2, 0.8, 0.1))
    assert crit(recoloured, target)[0] > 0.01


def jittered_clip(xs, ys, size: int = 5, bg: float = -0.6, fg=(0.8, -0.2, 0.1), distractor=None) -> torch.Tensor:
    """(1, 3, T, 32, 32): a square of ``size`` with its top-left corner at (xs[t], ys[t]) in frame t;
    ``distractor`` (x, y, size, grey) adds a still grey square."""
    clip = torch.full((1, 3, len(xs), 32, 32), bg)
    for t, (x, y) in enumerate(zip(xs, ys)):
        if distractor is not None:
            dx, dy, ds, grey = distractor
            clip[0, :, t, dy:dy + ds, dx:dx + ds] = grey
        for c, v in enumerate(fg):
            clip[0, c, t, y:y + size, x:x + size] = v
    return clip


def test_object_centroids_follow_the_object_frame_by_frame():
    clip = jittered_clip([10, 12, 15], [6, 5, 9])
    # a 5-pixel square's centroid is its corner + 2
    torch.testing.assert_close(object_centroids(clip)[0], torch.tensor([[12.0, 8.0], [14.0, 7.0], [17.0, 11.0]]))
    assert object_centroid(clip)[0].tolist() == pytest.approx([43 / 3, 26 / 3])


def test_shift_frames_moves_each_frame_by_its_own_offset():
    torch.manual_seed(0)
    v = torch.randn(1, 3, 2, 8, 8)
    out = shift_frames(v, torch.tensor([[2, -1]]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(out[0, :, 0, 1:, 2:], v[0, :, 0, :-1, :-2])  # frame 0: right 2, down 1
    torch.testing.assert_close(out[0, :, 0, 0, 2:], v[0, :, 0, 0, :-2])  # the top row repeats
    torch.testing.assert_close(out[0, :, 1, :, :-1], v[0, :, 1, :, 1:])  # frame 1: left 1
    torch.testing.assert_close(shift_clips(v, torch.tensor([2]), torch.tensor([1])),
                               shift_frames(v, torch.tensor([[2, 2]]), torch.tensor([[1, 1]])))


def test_best_shift_finds_the_translation_by_exhaustive_search():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 2, 12, 12)
    dx, dy = torch.tensor([[2, -1], [0, 3]]), torch.tensor([[1, 2], [-3, 0]])
    prediction = shift_frames(target, dx, dy)
    ex, ey = best_shift(prediction, target, radius=3, per="frame")
    assert ex.tolist() == dx.tolist() and ey.tolist() == dy.tolist()
    # by hand for one frame: the squared error of every candidate shift, edges repeated
    errors = {(a, b): float(((shift_frames(target[:1], torch.tensor([[a, a]]), torch.tensor([[b, b]]))
                              - prediction[:1]) ** 2)[:, :, 0].sum())
              for a in range(-3, 4) for b in range(-3, 4)}
    assert min(errors, key=errors.get) == (2, 1)
    # per clip: one shift for both frames, the one with the least error summed over them
    same = shift_frames(target, torch.tensor([[1, 1], [-2, -2]]), torch.tensor([[0, 0], [2, 2]]))
    cx, cy = best_shift(same, target, radius=2, per="clip")
    assert cx.tolist() == [[1, 1], [-2, -2]] and cy.tolist() == [[0, 0], [2, 2]]
    assert [t.tolist() for t in best_shift(prediction, target, radius=0)] == [[[0, 0], [0, 0]]] * 2


def test_frame_alignment_forgives_where_each_frame_puts_the_object():
    """A training clip samples its frames at random offsets, so the object jitters along its path: one
    shift per clip leaves that jitter in the target, one per frame removes it."""
    target = jittered_clip([10, 13, 15], [6, 6, 6])
    drawn = jittered_clip([4, 6, 8], [12, 12, 12])  # a steady path elsewhere
    assert torch.equal(aligned_target(drawn, target, per="frame"), drawn)
    assert not torch.equal(aligned_target(drawn, target, per="clip"), drawn)
    with pytest.raises(ValueError, match="per"):
        aligned_target(drawn, target, per="pixel")


def test_alignment_search_finds_the_object_that_a_distractor_pulls_the_centroid_from():
    drawn = jittered_clip([8, 9], [8, 8])
    target = jittered_clip([14, 15], [12, 12], distractor=(24, 22, 4, 0.3))
    # the grey square stands out enough to count in the target's centroid: the centroid shift misses
    plain = aligned_target(drawn, target, per="frame")
    assert not torch.equal(foreground_mask(plain) * plain, foreground_mask(drawn) * drawn)
    searched = aligned_target(drawn, target, per="frame", search=5)
    obj = foreground_mask(drawn).bool().expand_as(drawn)
    assert torch.equal(searched[obj], drawn[obj])  # every object pixel lands on the drawn object


def test_alignment_anchors_on_the_generators_trajectory():
    target = jittered_clip([10, 11], [6, 6])
    drawn = jittered_clip([20, 21], [20, 20])
    # the generator says its object is centred at (5, 9) and (7, 9): the target's goes there
    anchor = torch.tensor([[[5.0, 9.0], [7.0, 9.0]]])
    out = aligned_target(drawn, target, per="frame", anchor=anchor)
    torch.testing.assert_close(object_centroids(out)[0], torch.tensor([[5.0, 9.0], [7.0, 9.0]]))


def test_trajectory_pixels_and_loss_by_hand():
    # normalised -1 is the left edge of pixel 0, +1 the right edge of pixel W-1: centres at -1 + (2i + 1) / W
    traj = torch.tensor([[[-1 + 1 / 32, -1 + 1 / 32], [0.0, 0.0]]])
    assert trajectory_pixels(traj, 32, 32)[0].tolist() == [[0.0, 0.0], [15.5, 15.5]]
    target = jittered_clip([10, 12], [6, 6])  # centroids (12, 8) and (14, 8)
    goal = [[(12 + 0.5) / 16 - 1, (8 + 0.5) / 16 - 1], [(14 + 0.5) / 16 - 1, (8 + 0.5) / 16 - 1]]
    drawn = torch.tensor([[[goal[0][0] + 0.1, goal[0][1]], [goal[1][0], goal[1][1] - 0.2]]], requires_grad=True)
    loss = trajectory_loss(drawn, target)
    assert loss.item() == pytest.approx((0.1 ** 2 + 0.2 ** 2) / 2, rel=1e-5)
    loss.backward()
    assert drawn.grad[0, 0, 0].item() == pytest.approx(2 * 0.1 / 2, rel=1e-4)  # d/dx of the mean of 2 terms


def test_video_generation_loss_trajectory_term_and_its_requirement():
    target = jittered_clip([10, 12], [6, 6])
    crit = VideoGenerationLoss(pixel_loss="mse", pixel_loss_weight=0.0, perceptual_loss_weight=0.0,
                               temporal_consistency_weight=0.0, trajectory_loss_weight=2.0)
    with pytest.raises(ValueError, match="trajectory_loss_weight"):
        crit(target, target)
    traj = torch.zeros(1, 2, 2)
    total, parts = crit(target, target, trajectory=traj)
    assert total.item() == pytest.approx(2.0 * trajectory_loss(traj, target).item())
    with pytest.raises(ValueError, match="alignment"):
        VideoGenerationLoss(alignment="pixel")


PALETTE = torch.tensor([[220.0, 40, 40], [40, 190, 60], [40, 80, 230], [235, 215, 40]])


def test_dominant_colour_names_the_object_even_when_faint_and_nothing_for_a_flat_clip():
    def clip_with(rgb, strength=1.0):
        bg = torch.tensor([60.0, 60, 60])
        img = bg[:, None, None, None].expand(3, 4, 32, 32).clone()
        img[:, :, 10:16, 10:16] = (bg + strength * (torch.tensor(rgb) - bg))[:, None, None, None]
        return (img / 127.5 - 1)[None]

    clips = torch.cat([clip_with(PALETTE[i].tolist()) for i in range(4)] +
                      [clip_with(PALETTE[2].tolist(), strength=0.3), torch.full((1, 3, 4, 32, 32), -0.5)])
    assert dominant_colour(clips, PALETTE).tolist() == [0, 1, 2, 3, 2, -1]
