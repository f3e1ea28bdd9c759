"""video_text_matching and the text-to-video GAN/sample pieces, against hand-computed values."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heygen_ray.losses import contrastive_loss, match_loss
from heygen_ray.models import create_model
from heygen_ray.models.composite import hardest_negatives, same_caption
from heygen_ray.train.gan import discriminator_step, frozen
from heygen_ray.train.step import optimizer_step
from heygen_ray.train.tasks import DataInfo, chance_recall, get_task, retrieval_recall

NOAMP = __import__("contextlib").nullcontext


def test_recall_on_a_hand_made_similarity_matrix():
    # 4 captions x 4 videos; captions 2 and 3 are the same text, so videos 2 and 3 are right for both
    sim = torch.tensor([
        [0.9, 0.1, 0.0, 0.2],   # caption 0: video 0 ranked first            -> hit@1
        [0.8, 0.3, 0.1, 0.0],   # caption 1: video 1 ranked second           -> miss@1, hit@2
        [0.1, 0.2, 0.3, 0.9],   # caption 2: video 3 first, a shared positive -> hit@1
        [0.9, 0.8, 0.7, 0.1],   # caption 3: video 2 third                   -> miss@1, miss@2, hit@3
    ])
    positives = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    r = retrieval_recall(sim, positives, ks=(1, 2, 3, 5))
    assert r == {"recall_at_1": 0.5, "recall_at_2": 0.75, "recall_at_3": 1.0, "recall_at_5": 1.0}


def test_chance_recall_counts_shared_positives():
    positives = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    c = chance_recall(positives, ks=(1, 2))
    # one positive of 4: 1/4 at k=1, 1 - C(3,2)/C(4,2) = 1/2 at k=2; two positives: 1/2 and 1 - 1/6
    assert c["recall_at_1"] == pytest.approx((0.25 + 0.25 + 0.5 + 0.5) / 4)
    assert c["recall_at_2"] == pytest.approx((0.5 + 0.5 + 5 / 6 + 5 / 6) / 4)


def test_same_caption_ignores_padding_and_hardest_negative_skips_positives():
    ids = torch.tensor([[5, 6, 0], [5, 6, 9], [7, 8, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    same = same_caption(ids, mask)
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.5], [0.7, 0.3, 0.9]])
    index, valid = hardest_negatives(sim, same)
    assert index.tolist() == [2, 2, 0] and valid.all()
    _, valid = hardest_negatives(sim, torch.ones(3, 3, dtype=torch.bool))
    assert not valid.any()  # a batch of one caption has no negative
    # sampled: never a positive, and drawn in proportion to softmax(similarity) over the negatives
    torch.manual_seed(0)
    sim = torch.tensor([[0.0, 0.0, math.log(3.0)]]).expand(4000, 3)
    pos = torch.tensor([[True, False, False]]).expand(4000, 3)
    index, _ = hardest_negatives(sim, pos, sample=True)
    assert (index != 0).all() and abs(float((index == 2).float().mean()) - 0.75) < 0.03


def test_contrastive_loss_is_clip_loss_with_identity_positives_and_averages_shared_ones():
    torch.manual_seed(0)
    logits = torch.randn(5, 5)
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    assert contrastive_loss(logits, torch.eye(5, dtype=torch.bool)) == pytest.approx(float(clip), rel=1e-6)
    # 2 x 2, both captions identical: every column is right, each with target 1/2
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    pos = torch.ones(2, 2, dtype=torch.bool)
    ls_r, ls_c = F.log_softmax(logits, 1), F.log_softmax(logits, 0)
    expected = 0.5 * (-(ls_r.sum(1) / 2).mean() - (ls_c.sum(0) / 2).mean())
    assert contrastive_loss(logits, pos) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        contrastive_loss(logits, torch.tensor([[True, False], [True, False]]))


def test_match_loss_leaves_out_invalid_negatives():
    pos, neg = torch.tensor([0.0, 2.0]), torch.tensor([0.0, 5.0, -1.0, 3.0])
    valid = torch.tensor([True, False, True, False])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x)
    expected = 0.5 * ((sp(-0.0) + sp(-2.0)) / 2 + (sp(0.0) + sp(-1.0)) / 2)  # class-balanced
    assert match_loss(pos, neg, valid) == pytest.approx(expected, rel=1e-6)


def tiny_info():
    return DataInfo(clip_frames=8, height=32, width=32, caption_tokens=8, vocab_size=40)


def matching_batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (b, 8), generator=g)
    ids[1] = ids[0]  # a duplicate caption in the batch
    return {"video": torch.randint(0, 255, (b, 8, 32, 32, 3), dtype=torch.uint8, generator=g),
            "caption_ids": ids, "caption_mask": torch.ones(b, 8, dtype=torch.bool)}


def test_matching_task_trains_its_loss_down_and_reports_recall():
    torch.manual_seed(0)
    task, info = get_task("video_text_matching"), tiny_info()
    model = create_model("video_text_matching_micro", **task.model_overrides(info))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = matching_batch()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [optimizer_step(model, model, task, [batch], opt, scaler, NOAMP, 1.0)[0] for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    state = task.new_metrics(info)
    with torch.no_grad():
        inputs, targets = task.inputs(batch)
        task.update_metrics(state, model(**inputs, **task.forward_kwargs), targets)
    m = task.compute_metrics(state)
    # memorised: every caption finds its clip; captions 0 and 1 share two clips (chance is higher there)
    assert m["recall_at_1"] == 1.0 and m["recall_at_5"] == 1.0 and m["samples"] == 6
    assert m["chance_recall_at_1"] == pytest.approx((2 / 6 * 2 + 1 / 6 * 4) / 6)
    # (the fused match head needs real structure to learn from; the integration test checks it)
    # serving form: (B, 2) = [match logit, scaled cosine of the pair], consistent with the training form
    with torch.no_grad():
        scores, full = model(**inputs), model(**inputs, outputs="all")
    cosine = full["logit_scale"] * (full["video_embeddings"] * full["text_embeddings"]).sum(-1)
    assert scores.shape == (6, 2)
    torch.testing.assert_close(scores[:, 1], cosine)
    torch.testing.assert_close(scores[:, 0], full["match_positive"])


def test_gan_steps_alternate_without_leaking_gradients():
    torch.manual_seed(0)
    task = get_task("text_to_video", loss_weights={"adversarial_loss_weight": 0.5},
                    discriminator={"base_channels": 8, "num_layers": 2})
    info = DataInfo(clip_frames=8, height=32, width=32, caption_tokens=8, vocab_size=40)
    gen = create_model("text_to_video_micro", **task.model_overrides(info))
    disc = task.discriminator
    assert disc is not None and task.criterion.discriminator is disc
    g_opt, d_opt = torch.optim.AdamW(gen.parameters(), lr=1e-3), torch.optim.AdamW(disc.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = {k: v for k, v in matching_batch(4).items()}
    d_before = {k: v.detach().clone() for k, v in disc.named_parameters()}
    g_before = [p.clone() for p in gen.parameters()]
    pairs = []
    with frozen(disc):
        optimizer_step(gen, gen, task, [batch], g_opt, scaler, NOAMP, 1.0, step=0, collect=pairs)
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again
    assert all(p.grad is None for p in disc.parameters())  # the generator's step left D untouched
    assert d_before and all(torch.equal(v, dict(disc.named_parameters())[k]) for k, v in d_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(g_before, gen.parameters()))
    assert len(pairs) == 1 and not pairs[0][0].requires_grad
    stats = discriminator_step(disc, disc, task, pairs, d_opt, scaler, NOAMP, 1.0)
    assert set(stats) >= {"d_loss", "d_real", "d_fake", "d_grad_norm"} and stats["d_grad_norm"] > 0
    assert any(not torch.equal(v, dict(disc.named_parameters())[k]) for k, v in d_before.items())  # D moved
    # the adversarial term starts at adversarial_start_step
    late = get_task("text_to_video", loss_weights={"adversarial_loss_weight": 0.5, "adversarial_start_step": 10})
    out, tgt = torch.zeros(2, 3, 8, 32, 32), torch.zeros(2, 3, 8, 32, 32)
    assert "adversarial" not in late.criterion(out, tgt, step=5)[1]
    assert "adversarial" in late.criterion(out, tgt, step=10)[1]


def test_text_to_video_samples_are_decodable_mp4_and_gif(tmp_path):
    import av

    task, info = get_task("text_to_video"), tiny_info()
    model = create_model("text_to_video_micro", **task.model_overrides(info))
    batch = {k: v[:3] for k, v in matching_batch(3).items()}
    # flat colour quadrants (a GIF has a 256-colour palette: random noise would not survive it)
    video = torch.zeros(3, 8, 32, 32, 3, dtype=torch.uint8)
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]):
        video[:, :, (i // 2) * 16:(i // 2 + 1) * 16, (i % 2) * 16:(i % 2 + 1) * 16] = torch.tensor(colour, dtype=torch.uint8)
    batch["video"] = video
    files = task.media(model, batch, info)
    assert set(files) == {"samples.mp4", "samples.gif", "samples_strip.png", "captions.txt"}
    # 3 rows x [generated | real], 32 px cells upscaled 4x with 2 px gaps: 3*128+4*2 = 392, 2*128+3*2 = 262
    for name, fmt in (("samples.mp4", "mp4"), ("samples.gif", "gif")):
        with av.open(io.BytesIO(files[name]), format=fmt) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 8, name
        assert frames[0].shape == (392, 262, 3), name
    # the right column of the first row is the real clip: compare the GIF's pixels to the source
    with av.open(io.BytesIO(files["samples.gif"]), format="gif") as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    real_cell = first[2:130, 132:260][::4, ::4].astype(int)
    assert np.abs(real_cell - batch["video"][0, 0].numpy().astype(int)).mean() < 3  # GIF palette error only
    assert files["captions.txt"].decode().count("\n") == 4
    # the still: frames 0, 2, 4, 6 of the grid left to right, 6 px apart; frame 0's real cell is the source
    from PIL import Image

    strip = np.asarray(Image.open(io.BytesIO(files["samples_strip.png"])).convert("RGB"))
    assert strip.shape == (392, 4 * 262 + 3 * 6, 3)
    assert np.abs(strip[2:130, 132:260][::4, ::4].astype(int) - batch["video"][0, 0].numpy().astype(int)).max() == 0


def _judged_batch(tmp_path, n=32):
    """n embedded-set clips as float (B, C, T, H, W) at 32 x 32, their labels and tokenized captions."""
    import json as _json

    from heygen_ray.config import SynthSpec
    from heygen_ray.data.synthetic import clip_params, render_clip
    from heygen_ray.data.text import train_tokenizer

    spec = SynthSpec(num_clips=n, seed=4, height=32, width=32)
    params = [clip_params(spec, i) for i in range(n)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(_json.dumps({"text": p.caption}) + "\n" for p in params) * 4)
    tok = train_tokenizer(str(corpus), str(tmp_path / "tok"), vocab_size=300, min_frequency=1)
    clips = np.stack([render_clip(p, 8, 32, 32) for p in params])  # (B, T, H, W, C) uint8
    video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    ids = [tok.encode(p.caption) for p in params]
    length = max(map(len, ids))
    caption_ids = torch.zeros(n, length, dtype=torch.int64)
    caption_mask = torch.zeros(n, length, dtype=torch.bool)
    for i, row in enumerate(ids):
        caption_ids[i, :len(row)], caption_mask[i, :len(row)] = torch.tensor(row), True
    info = DataInfo(label_names=spec.label_names, num_classes=16, clip_frames=8, height=32, width=32,
                    tokenizer_dir=str(tmp_path / "tok"))
    labels = torch.tensor([p.label for p in params])
    return video, labels, caption_ids, caption_mask, info, spec


def test_judge_of_a_generator_that_returns_the_real_clips_equals_the_classifiers_accuracy(tmp_path):
    from heygen_ray.config import COLORS
    from heygen_ray.train.tasks import Judge

    video, labels, ids, mask, info, spec = _judged_batch(tmp_path)
    torch.manual_seed(0)
    classifier = create_model("cnn_video_micro").eval()
    # a judge whose label order differs from the data's: labels are matched by name
    judge_labels = list(reversed(spec.label_names))
    classifier.head.weight.data = classifier.head.weight.data.flip(0)
    classifier.head.bias.data = torch.linspace(-1, 1, 16)
    task = get_task("text_to_video", loss_weights={"perceptual_loss_weight": 0.0},
                    judge=Judge(classifier, judge_labels, COLORS, info.tokenizer_dir))
    assert "label" in task.columns
    state = task.new_metrics(info)
    batch = {"video": video, "label": labels, "caption_ids": ids, "caption_mask": mask}
    task.update_metrics(state, video, video, batch)  # "generated" = the real clips
    m = task.compute_metrics(state)
    with torch.no_grad():
        said = [judge_labels[i] for i in classifier(video=video).argmax(-1).tolist()]
    own = float(np.mean([s == spec.label_names[int(y)] for s, y in zip(said, labels)]))
    assert m["judge_accuracy"] == pytest.approx(own) and m["judge_real_accuracy"] == pytest.approx(own)
    assert m["colour_accuracy"] == 1.0 == m["colour_real_accuracy"]  # the rendered colours are the captions'
    assert m["judge_chance"] == pytest.approx(1 / 16)


def test_judge_of_a_flat_generator_is_at_chance(tmp_path):
    from heygen_ray.config import COLORS
    from heygen_ray.train.tasks import Judge

    video, labels, ids, mask, info, spec = _judged_batch(tmp_path)
    torch.manual_seed(0)
    classifier = create_model("cnn_video_micro").eval()
    task = get_task("text_to_video", loss_weights={"perceptual_loss_weight": 0.0},
                    judge=Judge(classifier, spec.label_names, COLORS, info.tokenizer_dir))
    state = task.new_metrics(info)
    flat = torch.full_like(video, -0.6)
    task.update_metrics(state, flat, video, {"video": video, "label": labels, "caption_ids": ids, "caption_mask": mask})
    m = task.compute_metrics(state)
    # one answer for every clip: right for exactly the clips of that label (2 of 32, labels cycle over 16)
    assert m["judge_accuracy"] == pytest.approx(2 / 32)
    assert m["colour_accuracy"] == 0.0 and m["colour_real_accuracy"] == 1.0
