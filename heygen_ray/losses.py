"""Losses and image-quality metrics: pure PyTorch (no ray, no mlflow, no downloaded weights).

Videos are float (B, C, T, H, W) in [-1, 1], so the default `data_range` of SSIM and PSNR is 2.0
(max - min of the value range); pass 1.0 for [0, 1] data or 255.0 for bytes.

- `ssim`, `psnr`: metrics (also used inside the losses); `ssim` is per frame with a Gaussian
  window (11, sigma 1.5; Wang et al. 2004), averaged over frames, channels and pixels.
- `DistillationLoss`: Hinton et al. 2015 temperature-scaled KL (x T^2) mixed with the hard-label
  cross-entropy by alpha, plus an optional hidden-state (FitNets-style) MSE term.
- `VideoGenerationLoss`: pixel L1/MSE (optionally foreground-weighted, and optionally against the
  target translated onto the generated object, per clip or per frame: `aligned_target`) + a
  trajectory term for generators that say where they drew their object + weight-free perceptual term
  ((1 - SSIM) + image-gradient L1) + temporal consistency (L1 between frame differences) + optional
  3D-FFT L1 + optional adversarial hinge term with `PatchDiscriminator3D`.

Every loss module returns `(total, components)`: components are detached scalars for logging.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from heygen_ray.registry import LOSSES

Components = Dict[str, torch.Tensor]


# -- metrics -----------------------------------------------------------------------------------
def _frames(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(B, C, T, H, W) -> (B*T, C, H, W) and T; (B, C, H, W) passes through with T = 1."""
    if x.ndim == 4:
        return x, 1
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, T, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w), t


def gaussian_window(size: int, sigma: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,)."""
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity of videos (B, C, T, H, W) or images (B, C, H, W), frame by frame.

    Local statistics use a separable Gaussian window over valid positions (no padding), as in the
    reference implementation; the window shrinks (to an odd size) for frames smaller than it.
    Computed in float32. reduction "mean" -> scalar, "none" -> per sample (B,).
    """
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    batch = x.shape[0]
    xf, t = _frames(x.float())
    yf, _ = _frames(y.float())
    c, h, w = xf.shape[1:]
    size = min(window_size, h, w)
    size -= 1 - size % 2  # odd
    g = gaussian_window(size, sigma, x.device)
    kh, kw = g.view(1, 1, size, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, size).repeat(c, 1, 1, 1)  # depthwise

    def blur(z: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H-size+1, W-size+1)
        return F.conv2d(F.conv2d(z, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(xf), blur(yf)
    var_x = blur(xf * xf) - mu_x * mu_x
    var_y = blur(yf * yf) - mu_y * mu_y
    cov = blur(xf * yf) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    per_sample = s.mean(dim=(1, 2, 3)).view(batch, t).mean(dim=1)  # (B,)
    return per_sample.mean() if reduction == "mean" else per_sample


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per sample (over C, T, H, W) then averaged over the batch.

    10 log10(data_range^2 / MSE); the MSE is clamped at 1e-10, so identical inputs give a finite
    ceiling (106 dB for data_range 2) instead of inf. reduction "none" -> (B,).
    """
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)  # (B,)
    per_sample = 10.0 * torch.log10(data_range**2 / mse)
    return per_sample.mean() if reduction == "mean" else per_sample


# -- video loss terms ----------------------------------------------------------------------------
def image_gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of each frame (edge sharpness)."""
    def grads(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return z[..., :, 1:] - z[..., :, :-1], z[..., 1:, :] - z[..., :-1, :]

    (px, py), (tx, ty) = grads(prediction), grads(target)
    return (px - tx).abs().mean() + (py - ty).abs().mean()


def temporal_consistency_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between consecutive-frame differences of prediction and target (B, C, T, H, W):
    penalises wrong motion and flicker. Zero for a single frame."""
    if prediction.shape[2] < 2:
        return prediction.new_zeros(())
    return (torch.diff(prediction, dim=2) - torch.diff(target, dim=2)).abs().mean()


def frequency_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between 3D (T, H, W) orthonormal FFTs: counters spectral blur; temporal frequencies
    penalise flicker."""
    dims = (-3, -2, -1)
    fp = torch.fft.rfftn(prediction.float(), dim=dims, norm="ortho")
    ft = torch.fft.rfftn(target.float(), dim=dims, norm="ortho")
    return (fp - ft).abs().mean()


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))) (taming-transformers)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean(D(fake)): the generator's side of the hinge GAN."""
    return -fake_logits.mean()


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: spectral-norm Conv3d stack with LeakyReLU(0.2) -> a map of real/fake logits.

    Kernels 4 x 4 x 4 with stride 2 for the first `temporal_downsample_layers` layers, then
    3 x 4 x 4 with stride (1, 2, 2) (so short clips keep a temporal extent), channels doubling up
    to 8 x base; a final 3 x 3 x 3 conv gives one logit per patch. (B, C, T, H, W) -> (B, 1, t, h, w).
    """

    def __init__(
        self, in_channels: int = 3, base_channels: int = 32, num_layers: int = 3, temporal_downsample_layers: int = 1
    ) -> None:
        super().__init__()
        layers, c_in = [], in_channels
        for i in range(num_layers):
            c_out = base_channels * min(2**i, 8)
            temporal = i < temporal_downsample_layers
            conv = nn.Conv3d(c_in, c_out, (4 if temporal else 3, 4, 4), stride=(2 if temporal else 1, 2, 2), padding=1)
            layers += [spectral_norm(conv), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(spectral_norm(nn.Conv3d(c_in, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


# -- object-aware pixel losses for generation --------------------------------------------------
def clip_background(video: torch.Tensor) -> torch.Tensor:
    """Per clip and channel, the median over frames and pixels: (B, C, T, H, W) -> (B, C, 1, 1, 1)
    (the background colour of a clip whose objects cover less than half of it)."""
    return video.flatten(2).median(dim=-1).values[:, :, None, None, None]


def foreground_mask(video: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, 1, T, H, W) float: 1 where the channels' summed |pixel - background|
    exceeds ``threshold`` (in the [-1, 1] value range: 0.4 is 51 grey levels)."""
    return ((video - clip_background(video)).abs().sum(dim=1, keepdim=True) > threshold).to(video.dtype)


def weighted_pixel_loss(prediction: torch.Tensor, target: torch.Tensor, foreground_weight: float = 0.0,
                        kind: str = "mse") -> torch.Tensor:
    """Mean L1/MSE where the target's foreground pixels (``foreground_mask``) weigh
    1 + foreground_weight and the rest 1: a small object is a few percent of a clip, and unweighted
    its error is lost under the background's noise."""
    err = (prediction - target).abs() if kind == "l1" else (prediction - target) ** 2
    if foreground_weight == 0:
        return err.mean()
    w = (1.0 + foreground_weight * foreground_mask(target)).expand_as(err)
    return (err * w).sum() / w.sum()


def object_centroids(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T, 2): per frame, the (x, y) pixel centroid of what differs most from the
    background (pixels at least half as far from it as the farthest one of their frame; x, y are pixel
    indices). Differentiable in the pixel values (the selection of pixels is not)."""
    dist = (video - clip_background(video)).norm(dim=1)  # (B, T, H, W)
    peak = dist.detach().flatten(2).amax(dim=-1)[..., None, None]
    w = torch.where(dist >= 0.5 * peak, dist, torch.zeros_like(dist))
    h, wd = video.shape[-2:]
    ys = torch.arange(h, device=video.device, dtype=video.dtype)[:, None]
    xs = torch.arange(wd, device=video.device, dtype=video.dtype)[None, :]
    mass = w.sum(dim=(2, 3)).clamp_min(1e-6)  # (B, T)
    return torch.stack([(w * xs).sum(dim=(2, 3)) / mass, (w * ys).sum(dim=(2, 3)) / mass], dim=-1)


def object_centroid(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, 2): `object_centroids` averaged over frames."""
    return object_centroids(video).mean(dim=1)


def shift_frames(video: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Translate each frame by integer (dx[b, t], dy[b, t]) pixels (right / down), repeating the edge
    pixels into the gap: (B, C, T, H, W) -> same shape."""
    b, c, t, h, w = video.shape
    ys = (torch.arange(h, device=video.device)[None, None, :] - dy.long()[..., None]).clamp(0, h - 1)  # (B, T, H)
    xs = (torch.arange(w, device=video.device)[None, None, :] - dx.long()[..., None]).clamp(0, w - 1)  # (B, T, W)
    out = video.gather(3, ys[:, None, :, :, None].expand(b, c, t, h, w))
    return out.gather(4, xs[:, None, :, None, :].expand(b, c, t, h, w))


def shift_clips(video: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Translate each clip by integer (dx[b], dy[b]) pixels (right / down), every frame alike, repeating
    the edge pixels into the gap: (B, C, T, H, W) -> same shape."""
    t = video.shape[2]
    return shift_frames(video, dx[:, None].expand(-1, t), dy[:, None].expand(-1, t))


def best_shift(prediction: torch.Tensor, target: torch.Tensor, radius: int, per: str = "frame") -> Tuple[torch.Tensor, torch.Tensor]:
    """The integer translation (dx, dy), |dx|, |dy| <= radius, that brings ``target`` closest to
    ``prediction`` in squared error (edge pixels repeated), per frame or per clip: -> (B, T) each.

    ||p - s||^2 = ||p||^2 - 2 <p, s> + ||s||^2 for every shift s at once: the cross term is a grouped
    convolution of the padded target with the prediction as kernel, ||s||^2 one with a box of ones."""
    b, c, t, h, w = target.shape
    k = int(radius)
    if k <= 0:
        zero = torch.zeros(b, t, dtype=torch.long, device=target.device)
        return zero, zero
    n = b * t * c
    p = prediction.detach().float().transpose(1, 2).reshape(1, n, h, w)
    s = F.pad(target.detach().float().transpose(1, 2).reshape(1, n, h, w), (k, k, k, k), mode="replicate")
    cross = F.conv2d(s, p.reshape(n, 1, h, w), groups=n)  # (1, n, 2k+1, 2k+1)
    energy = F.conv2d(s * s, torch.ones(n, 1, h, w, device=s.device), groups=n)
    score = (energy - 2.0 * cross).view(b, t, c, 2 * k + 1, 2 * k + 1).sum(dim=2)  # (B, T, 2k+1, 2k+1)
    if per == "clip":
        score = score.sum(dim=1, keepdim=True).expand(b, t, -1, -1)
    j = score.flatten(2).argmin(dim=-1)  # (B, T)
    # output (i, j) compares the prediction with the padded target's window at (i, j): the target
    # shifted by (k - j, k - i) pixels right / down
    return k - j % (2 * k + 1), k - j // (2 * k + 1)


def aligned_target(prediction: torch.Tensor, target: torch.Tensor, per: str = "clip", search: int = 0,
                   anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The target translated so that its object falls on the prediction's (no gradient flows through
    the alignment). ``per`` "clip": one shift per clip (the target's centroid averaged over frames
    onto the prediction's); "frame": one per frame, which also forgives where a randomly sampled
    training frame puts the object along its path. ``anchor`` (B, T, 2): where the generated object
    is, in pixels (a generator's own trajectory); default the prediction's object centroids.
    ``search`` > 0 then refines each shift by the translation within that many pixels that matches
    the prediction best: a centroid is pulled off the object by anything else that stands out (the
    embedded set's grey distractors), the best match is not."""
    if per not in ("clip", "frame"):
        raise ValueError(f"per must be 'clip' or 'frame', got {per!r}")
    with torch.no_grad():
        here = object_centroids(prediction.detach().float()) if anchor is None else anchor.detach().float()
        d = here - object_centroids(target.float())  # (B, T, 2)
        if per == "clip":
            d = d.mean(dim=1, keepdim=True).expand_as(d)
        d = d.round().long()
        out = shift_frames(target, d[..., 0], d[..., 1])
        if search > 0:
            ex, ey = best_shift(prediction, out, search, per)
            out = shift_frames(target, d[..., 0] + ex, d[..., 1] + ey)
    return out


def trajectory_pixels(trajectory: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A trajectory in normalised coordinates (B, T, 2), (-1, -1) the top-left corner of the frame and
    (1, 1) the bottom-right one (``F.grid_sample`` with align_corners=False), as pixel indices."""
    scale = torch.tensor([width / 2.0, height / 2.0], device=trajectory.device, dtype=trajectory.dtype)
    return (trajectory + 1.0) * scale - 0.5


def trajectory_loss(trajectory: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance, in normalised coordinates (see `trajectory_pixels`), between a
    generator's object path (B, T, 2) and the path of the target's object (`object_centroids`)."""
    h, w = target.shape[-2:]
    with torch.no_grad():
        c = object_centroids(target.float())  # (B, T, 2) pixels
        scale = torch.tensor([w / 2.0, h / 2.0], device=c.device)
        goal = (c + 0.5) / scale - 1.0
    return (trajectory.float() - goal).pow(2).sum(dim=-1).mean()


def dominant_colour(video: torch.Tensor, palette: torch.Tensor, share: float = 0.02, min_contrast: float = 0.05,
                    min_chroma: float = 30.0) -> torch.Tensor:
    """Which ``palette`` colour (K, 3) RGB in 0..255 a clip's object has: (B, C, T, H, W) in [-1, 1] ->
    (B,) palette index, -1 for a clip with nothing standing out (no pixel ``min_contrast`` from the
    background). The ``share`` of pixels whose difference from the background is most coloured (its
    chroma, max - min over RGB; grey clutter has none) give the object's colour as their mean
    difference, compared by direction (cosine) with each palette colour's own difference from that
    background: a faint or blurred object keeps its hue, so it still counts. When nothing is
    coloured (< ``min_chroma``), the pixels farthest from the background are taken instead."""
    x = (video.float() + 1.0) * 127.5  # (B, C, T, H, W) in 0..255
    bg = clip_background(x)  # (B, C, 1, 1, 1)
    flat = (x - bg).flatten(2)  # (B, C, N)
    dist = flat.norm(dim=1)  # (B, N)
    chroma = flat.amax(dim=1) - flat.amin(dim=1)  # (B, N)
    k = max(1, int(dist.shape[1] * share))
    coloured = chroma.topk(k, dim=1)
    rank = torch.where(coloured.values[:, -1:] >= min_chroma, chroma, dist)
    top = rank.topk(k, dim=1).indices  # (B, k)
    mean_diff = flat.gather(2, top[:, None, :].expand(-1, flat.shape[1], -1)).mean(dim=2)  # (B, C)
    candidates = palette.to(x)[None] - bg.flatten(1)[:, None, :]  # (B, K, C)
    score = F.cosine_similarity(mean_diff[:, None, :], candidates, dim=-1)  # (B, K)
    out = score.argmax(dim=1)
    return torch.where(dist.amax(dim=1) >= min_contrast * 127.5, out, torch.full_like(out, -1))


@LOSSES.register("video_generation")
class VideoGenerationLoss(nn.Module):
    """Weighted sum of pixel, perceptual, temporal-consistency, (frequency) and adversarial terms.

    total = pixel_loss_weight * pixel + aligned_pixel_loss_weight * pixel against `aligned_target`
            + trajectory_loss_weight * `trajectory_loss` + perceptual_loss_weight * ((1 - SSIM) + gradient L1)
            + temporal_consistency_weight * temporal + frequency_loss_weight * fft L1
            + adversarial_loss_weight * generator hinge (from step >= adversarial_start_step)

    The discriminator is built only when adversarial_loss_weight > 0 (or passed in) and lives at
    `self.discriminator`; train it with its own optimizer on `discriminator_loss(...)`, and zero its
    gradients after the generator step (the generator's adversarial term reaches it too).
    """

    def __init__(
        self,
        pixel_loss_weight: float = 1.0,
        perceptual_loss_weight: float = 0.2,
        temporal_consistency_weight: float = 0.5,
        adversarial_loss_weight: float = 0.0,
        frequency_loss_weight: float = 0.0,
        pixel_loss: str = "l1",
        data_range: float = 2.0,
        ssim_window_size: int = 11,
        ssim_sigma: float = 1.5,
        video_channels: int = 3,
        adversarial_start_step: int = 0,
        discriminator: Optional[nn.Module] = None,
        foreground_weight: float = 0.0,
        aligned_pixel_loss_weight: float = 0.0,
        alignment: str = "clip",
        alignment_search: int = 0,
        trajectory_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.foreground_weight, self.aligned_pixel_loss_weight = foreground_weight, aligned_pixel_loss_weight
        if alignment not in ("clip", "frame"):
            raise ValueError(f"alignment must be 'clip' or 'frame', got {alignment!r}")
        self.alignment, self.alignment_search = alignment, int(alignment_search)
        self.trajectory_loss_weight = trajectory_loss_weight
        if pixel_loss not in ("l1", "mse"):
            raise ValueError(f"pixel_loss must be 'l1' or 'mse', got {pixel_loss!r}")
        self.pixel_loss_weight, self.perceptual_loss_weight = pixel_loss_weight, perceptual_loss_weight
        self.temporal_consistency_weight, self.adversarial_loss_weight = temporal_consistency_weight, adversarial_loss_weight
        self.frequency_loss_weight, self.pixel_loss = frequency_loss_weight, pixel_loss
        self.data_range, self.ssim_window_size, self.ssim_sigma = data_range, ssim_window_size, ssim_sigma
        self.adversarial_start_step = adversarial_start_step
        if discriminator is None and adversarial_loss_weight > 0:
            discriminator = PatchDiscriminator3D(video_channels)
        self.discriminator = discriminator

    def forward(
        self, prediction: torch.Tensor, target: torch.Tensor, step: Optional[int] = None,
        trajectory: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Components]:
        """prediction, target: (B, C, T, H, W); ``trajectory`` (B, T, 2): where the generator drew its
        object (normalised, see `trajectory_pixels`), from a generator that has one. It anchors the
        alignment and is what the trajectory term supervises. Returns (total, detached components)."""
        if self.trajectory_loss_weight > 0 and trajectory is None:
            raise ValueError("loss.trajectory_loss_weight > 0 needs a generator that reports its object's trajectory "
                             "(a sprite generator, e.g. text_to_video_sprite_micro)")
        pred, tgt = prediction.float(), target.float()
        pixel = weighted_pixel_loss(pred, tgt, self.foreground_weight, self.pixel_loss)
        total = self.pixel_loss_weight * pixel
        parts = {"pixel": pixel}
        if self.aligned_pixel_loss_weight > 0:
            anchor = None if trajectory is None else trajectory_pixels(trajectory.detach().float(), *pred.shape[-2:])
            aligned = aligned_target(pred, tgt, self.alignment, self.alignment_search, anchor)
            parts["aligned_pixel"] = weighted_pixel_loss(pred, aligned, self.foreground_weight, self.pixel_loss)
            total = total + self.aligned_pixel_loss_weight * parts["aligned_pixel"]
        if self.trajectory_loss_weight > 0:
            parts["trajectory"] = trajectory_loss(trajectory, tgt)
            total = total + self.trajectory_loss_weight * parts["trajectory"]
        if self.perceptual_loss_weight > 0:
            parts["ssim"] = ssim(pred, tgt, self.data_range, self.ssim_window_size, self.ssim_sigma)
            parts["gradient"] = image_gradient_loss(pred, tgt)
            parts["perceptual"] = (1.0 - parts["ssim"]) + parts["gradient"]
            total = total + self.perceptual_loss_weight * parts["perceptual"]
        if self.temporal_consistency_weight > 0:
            parts["temporal"] = temporal_consistency_loss(pred, tgt)
            total = total + self.temporal_consistency_weight * parts["temporal"]
        if self.frequency_loss_weight > 0:
            parts["frequency"] = frequency_loss(pred, tgt)
            total = total + self.frequency_loss_weight * parts["frequency"]
        if self.adversarial_loss_weight > 0 and (step is None or step >= self.adversarial_start_step):
            parts["adversarial"] = generator_hinge_loss(self.discriminator(prediction))
            total = total + self.adversarial_loss_weight * parts["adversarial"]
        parts["total"] = total
        return total, {k: v.detach() for k, v in parts.items()}

    def discriminator_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Components]:
        """Hinge loss of the discriminator on real `target` vs generated `prediction` (detached)."""
        if self.discriminator is None:
            raise RuntimeError("no discriminator: adversarial_loss_weight is 0")
        real, fake = self.discriminator(target), self.discriminator(prediction.detach())
        loss = discriminator_hinge_loss(real, fake)
        return loss, {"discriminator": loss.detach(), "real_logits": real.mean().detach(), "fake_logits": fake.mean().detach()}


# -- video-text matching -----------------------------------------------------------------------
def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with shared positives: logits (N_text, N_video) = scale * cosine, positives
    (N_text, N_video) bool (duplicate captions make several columns right for one row).

    Each direction is the cross-entropy against the uniform distribution over that row's positives
    (CLIP's loss when positives is the identity); the result is the mean of both directions."""
    pos = positives.to(logits.dtype)
    if not pos.is_meta and (bool((pos.sum(1) == 0).any()) or bool((pos.sum(0) == 0).any())):
        raise ValueError("every caption and every clip needs at least one positive")
    logits = logits.float()
    t2v = -(F.log_softmax(logits, dim=1) * (pos / pos.sum(1, keepdim=True))).sum(1).mean()
    v2t = -(F.log_softmax(logits, dim=0) * (pos / pos.sum(0, keepdim=True))).sum(0).mean()
    return 0.5 * (t2v + v2t)


def match_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor,
               negative_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy of a match head, positives -> 1 and negatives -> 0, as the mean of the two
    classes' means (there are two negatives per positive: a plain mean would reward "never matches").
    Invalid negatives (a batch holding one caption only has none) are left out."""
    pos = F.binary_cross_entropy_with_logits(positive_logits.float(), torch.ones_like(positive_logits, dtype=torch.float32))
    w = torch.ones_like(negative_logits, dtype=torch.float32) if negative_valid is None else negative_valid.float()
    neg = (F.binary_cross_entropy_with_logits(negative_logits.float(), torch.zeros_like(w), reduction="none") * w).sum()
    return 0.5 * (pos + neg / w.sum().clamp_min(1.0))


# -- distillation --------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, averaged over positions.

    Logits (..., K); every leading position is one distribution ('batchmean' over positions).
    `weights` (...) (e.g. 0 on ignored tokens) turns the mean into a weighted mean.
    """
    k = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, k) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float().reshape(-1, k) / temperature, dim=-1)
    per_position = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)  # (N,)
    if weights is None:
        kl = per_position.mean()
    else:
        w = weights.reshape(-1).to(per_position.dtype)
        kl = (per_position * w).sum() / w.sum().clamp_min(1.0)
    return kl * temperature**2


def similarity_preserving_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving distillation (Tung & Mori, 2019): the student's batch similarity matrix
    should match the teacher's. Features (B, ...) are flattened per sample and centred over the batch
    (pooled post-ReLU features are all positive: uncentred, every pair looks alike and the term
    vanishes); G = F F^T (B, B) with rows L2-normalised; loss = ||G_s - G_t||_F^2 / B^2.
    Independent of the two widths, so a pruned student needs no learned projection (nothing extra
    to optimise, checkpoint or sync)."""
    b = student_hidden.shape[0]
    fs = student_hidden.float().reshape(b, -1)
    ft = teacher_hidden.detach().float().reshape(b, -1)
    fs, ft = fs - fs.mean(0, keepdim=True), ft - ft.mean(0, keepdim=True)
    gs = F.normalize(fs @ fs.t(), p=2, dim=1)
    gt = F.normalize(ft @ ft.t(), p=2, dim=1)
    return (gs - gt).pow(2).sum() / (b * b)


@LOSSES.register("distillation")
class DistillationLoss(nn.Module):
    """alpha * KD(T) + (1 - alpha) * CE(labels) [+ hidden_loss_weight * hidden term].

    Works for classifier logits (B, K) and language-model logits (B, L, V) with labels (B, L)
    (positions equal to ignore_index are left out of both terms). The hidden term compares student
    and teacher hidden states: ``hidden_loss="mse"``: MSE(proj(h_s), h_t), where with
    student_hidden_dimensions != teacher_hidden_dimensions a learned Linear maps student hidden
    states to the teacher's width (optimise it with the student: it is a parameter of this module);
    ``hidden_loss="similarity"``: `similarity_preserving_loss`, no parameters, any widths.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        alpha: float = 0.5,
        hidden_loss_weight: float = 0.0,
        student_hidden_dimensions: Optional[int] = None,
        teacher_hidden_dimensions: Optional[int] = None,
        ignore_index: int = -100,
        hidden_loss: str = "mse",
    ) -> None:
        super().__init__()
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError("need temperature > 0 and 0 <= alpha <= 1")
        if hidden_loss not in ("mse", "similarity"):
            raise ValueError(f"hidden_loss must be 'mse' or 'similarity', got {hidden_loss!r}")
        self.temperature, self.alpha, self.hidden_loss_weight = temperature, alpha, hidden_loss_weight
        self.ignore_index, self.hidden_loss = ignore_index, hidden_loss
        self.projection: nn.Module = nn.Identity()
        if (hidden_loss == "mse" and student_hidden_dimensions and teacher_hidden_dimensions
                and student_hidden_dimensions != teacher_hidden_dimensions):
            self.projection = nn.Linear(student_hidden_dimensions, teacher_hidden_dimensions)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        student_hidden: Optional[torch.Tensor] = None,
        teacher_hidden: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Components]:
        if labels is None and self.alpha < 1.0:
            raise ValueError("labels are required unless alpha == 1 (pure distillation)")
        weights = None if labels is None else (labels != self.ignore_index)
        kd = kd_loss(student_logits, teacher_logits, self.temperature, weights)
        parts = {"kd": kd}
        total = self.alpha * kd
        if labels is not None:
            k = student_logits.shape[-1]
            hard = F.cross_entropy(student_logits.float().reshape(-1, k), labels.reshape(-1), ignore_index=self.ignore_index)
            parts["hard"] = hard
            total = total + (1.0 - self.alpha) * hard
        if self.hidden_loss_weight > 0:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError("hidden_loss_weight > 0 needs student_hidden and teacher_hidden")
            if self.hidden_loss == "similarity":
                hidden = similarity_preserving_loss(student_hidden, teacher_hidden)
            else:
                hidden = F.mse_loss(self.projection(student_hidden.float()), teacher_hidden.detach().float())
            parts["hidden"] = hidden
            total = total + self.hidden_loss_weight * hidden
        parts["total"] = total
        return total, {k: v.detach() for k, v in parts.items()}


__all__ = [
    "DistillationLoss",
    "PatchDiscriminator3D",
    "VideoGenerationLoss",
    "contrastive_loss",
    "discriminator_hinge_loss",
    "frequency_loss",
    "gaussian_window",
    "generator_hinge_loss",
    "image_gradient_loss",
    "kd_loss",
    "match_loss",
    "psnr",
    "similarity_preserving_loss",
    "ssim",
    "temporal_consistency_loss",
    "trajectory_loss",
]
