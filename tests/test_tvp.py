"""TVP / VP: frame geometry, the official normalised-gradient step, FCA / TSE terms, gradients
reaching only the perturbation, losses that fall, the official prompt file format, and the
synthetic counting data. Tiny random-weight CLIPs only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prompttune.backbones.clip import CLIPBackbone
from prompttune.backbones.scorers import CLIPScorer
from prompttune.methods.tvp import (TransferableVisualPrompt, VisualPrompt, frame_geometry, frame_mask, load_prompt,
                                    normalized_step, pad_image, save_prompt)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPBackbone(zoo_entry="clip-tiny", weights="random")


CLASSES = ["one", "two", "three", "four"]
REPO = Path(__file__).resolve().parents[1]


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 4


def _method(clip, cls=VisualPrompt, **kw):
    m = cls(canvas_size=32, image_size=24, prompt_size=4, **kw)
    m.bind(clip, CLASSES)
    return m


# ---------------------------------------------------------------------------- geometry
def test_frame_mask_and_padding_geometry():
    m = frame_mask(32, 4)
    assert m.shape == (3, 32, 32)
    assert int(m.sum()) == 3 * (32 * 32 - 24 * 24)
    assert m[:, 4:28, 4:28].sum() == 0 and m[:, :4].min() == 1 and m[:, :, -4:].min() == 1
    # the official geometry: 224 canvas, 164 image, 30 px frame -> 69,840 prompt pixels in the frame
    assert int(frame_mask(224, 30).sum()) == 3 * (224 * 224 - 164 * 164) == 69840
    x = torch.rand(2, 3, 32, 32) + 0.5  # strictly positive
    p = pad_image(x, 32, 24)
    assert p.shape == (2, 3, 32, 32)
    assert p[:, :, :4].abs().max() == 0 and p[:, :, :, 28:].abs().max() == 0  # zero padding
    assert p[:, :, 4:28, 4:28].min() > 0


@pytest.mark.parametrize("canvas,image,frame,msg", [(32, 25, 4, "even"), (32, 40, 4, "at most"),
                                                    (32, 24, 0, "frame width"), (32, 24, 17, "frame width")])
def test_bad_geometry_is_rejected(canvas, image, frame, msg):
    with pytest.raises(ValueError, match=msg):
        frame_geometry(canvas, image, frame)


def test_normalized_step_matches_official_formula():
    g = torch.zeros(3, 8, 8)
    g[0, 0, 0], g[1, 4, 4] = 3.0, 4.0  # ||g|| = 5; (4, 4) is inside the frame-2 hole
    step = normalized_step(g, frame_mask(8, 2), lr=10.0)
    assert step[0, 0, 0].item() == pytest.approx(10 * 3 / 5)  # normalised over the whole canvas ...
    assert step[1, 4, 4].item() == 0.0  # ... then masked to the frame
    assert step.abs().sum().item() == pytest.approx(6.0)


def test_cosine_lr_per_epoch():
    assert VisualPrompt.cosine_lr(10, 0, 4) == pytest.approx(10)
    assert VisualPrompt.cosine_lr(10, 2, 4) == pytest.approx(5)
    assert VisualPrompt.cosine_lr(10, 1, 4) == pytest.approx(10 * 0.5 * (1 + math.cos(math.pi / 4)))


# ---------------------------------------------------------------------------- the method
def test_prompt_step_updates_only_the_frame_and_never_the_backbone(clip):
    m = _method(clip)
    assert [n for n, p in m.named_parameters()] == ["perturbation"]
    assert m.perturbation.abs().sum() == 0  # zero init (official)
    before = {n: p.detach().clone() for n, p in clip.named_parameters()}
    x, y = _batch()
    loss, parts = m.prompt_step(x, y, lr=1.0)
    assert torch.isfinite(loss) and set(parts) == {"task"}
    delta = m.perturbation.detach()
    assert delta[:, 4:28, 4:28].abs().sum() == 0  # confined to the frame
    assert delta.abs().sum() > 0
    assert delta.norm().item() <= 1.0 + 1e-5  # one normalised step of length <= lr
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    assert all(torch.equal(before[n], p) for n, p in clip.named_parameters())


def test_task_loss_falls_with_training(clip):
    m = _method(clip)
    x, y = _batch(16, seed=1)
    first, _ = m.objective(x, y)
    for _ in range(10):
        m.prompt_step(x, y, lr=2.0)
    last, _ = m.objective(x, y)
    assert last.item() < first.item() - 0.01, (first.item(), last.item())
    # and the sign matters: the same number of steps uphill makes it worse
    up = _method(clip)
    for _ in range(10):
        up.prompt_step(x, y, lr=-2.0)
    assert up.objective(x, y)[0].item() > first.item()


@pytest.fixture(scope="module")
def tse_clip():
    """A separate CLIP for TSE (the paper: a separate OpenAI ViT-B/32), other random weights."""
    torch.manual_seed(1)
    return CLIPBackbone(zoo_entry="clip-tiny", weights="random")


def test_fca_and_tse_terms(clip, tse_clip):
    m = _method(clip, TransferableVisualPrompt, fca=0.5, tse=0.1, tse_backbone=tse_clip)
    assert m.scorer("tse").backbone is tse_clip and m.scorer("source").backbone is clip
    x, y = _batch()
    loss, parts = m.objective(x, y)
    assert parts["fca"] == pytest.approx(0.0, abs=1e-4)  # delta = 0: prompted == clean
    # TSE against a hand computation on the separate CLIP: logit_scale (clamped at 100) * cos(image, text)
    s = CLIPScorer(tse_clip)
    clean = pad_image(x, 32, 24)
    img = F.normalize(tse_clip.encode_image(s.prepare(clean)), dim=-1)
    txt = F.normalize(tse_clip.encode_text(tse_clip.tokenize([f"this is a photo of a {CLASSES[i]}" for i in y])), dim=-1)
    want = (tse_clip.logit_scale.clamp(max=100) * (img * txt).sum(-1)).mean()
    assert parts["tse"] == pytest.approx(want.item(), rel=1e-4)
    assert loss.item() == pytest.approx(parts["task"] + 0.5 * parts["fca"] - 0.1 * parts["tse"], rel=1e-5)
    m.prompt_step(x, y, lr=1.0)
    _, parts2 = m.objective(x, y)
    assert parts2["fca"] > 0  # the prompted embedding now differs from the clean one


def test_gradient_shares_split_tvps_update_into_its_weighted_terms(clip, tse_clip):
    """The TVP probe (prompttune.transfer.gradient_shares): the frame-masked gradients of the
    weighted terms add up to the step's own gradient; VP's update is the task term alone."""
    from prompttune.transfer import gradient_shares

    x, y = _batch()
    m = _method(clip, TransferableVisualPrompt, fca=0.5, tse=5.0, tse_backbone=tse_clip)
    m.prompt_step(x, y, lr=1.0)  # off delta = 0, where FCA's gradient is 0
    out = gradient_shares(m, x, y)
    assert set(out) == {"grad_norm/task", "grad_norm/fca", "grad_norm/tse", "cos(update, task-only update)"}
    assert out["grad_norm/fca"] > 0 and out["grad_norm/tse"] > 0
    loss, _ = m.objective(x, y)
    (g,) = torch.autograd.grad(loss, m.perturbation)
    parts = {}
    for k, w in (("task", 1.0), ("fca", 0.5), ("tse", -5.0)):
        (gk,) = torch.autograd.grad(w * m.objective_terms(x, y)[k], m.perturbation)
        parts[k] = (gk * m.mask).flatten()
        assert out[f"grad_norm/{k}"] == pytest.approx(float(parts[k].norm()), rel=1e-5)
    total = sum(parts.values())
    torch.testing.assert_close(total, (g * m.mask).flatten(), rtol=1e-4, atol=1e-6)
    assert out["cos(update, task-only update)"] < 1.0
    vp = gradient_shares(_method(clip), x, y)
    assert set(vp) == {"grad_norm/task", "cos(update, task-only update)"}
    assert vp["cos(update, task-only update)"] == pytest.approx(1.0)


def test_tse_gradient_changes_the_update(clip, tse_clip):
    x, y = _batch()
    a, b = _method(clip), _method(clip, TransferableVisualPrompt, fca=0.0, tse=5.0, tse_backbone=tse_clip)
    a.prompt_step(x, y, 1.0)
    b.prompt_step(x, y, 1.0)
    assert not torch.allclose(a.perturbation, b.perturbation)


def test_forward_returns_logits_for_the_task(clip):
    m = _method(clip)
    x, _ = _batch(5)
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    out = m(clip, {"image": (x - mean) / std})
    assert out["logits"].shape == (5, 4)
    # the un-normalised input round-trips: same logits as scoring the raw pixels directly
    want = CLIPScorer(clip).class_scores(pad_image(x, 32, 24), CLASSES)
    assert torch.allclose(out["logits"], want, atol=1e-4)


def test_bad_options_are_rejected(clip):
    with pytest.raises(ValueError, match="fca"):
        VisualPrompt(fca=-1)
    with pytest.raises(TypeError, match="unknown vp option"):
        VisualPrompt(prompt_width=3)
    m = TransferableVisualPrompt(canvas_size=32, tse_backbone="clip_vit_b32_typo")
    with pytest.raises(Exception, match="clip_vit_b32_typo"):
        m.bind(clip, CLASSES)
    with pytest.raises(RuntimeError, match="setup"):
        VisualPrompt(canvas_size=32).objective(*_batch())


# ---------------------------------------------------------------------------- prompt files
def test_prompt_file_round_trip_in_official_format(tmp_path, clip):
    m = _method(clip)
    m.prompt_step(*_batch(), lr=1.0)
    path = tmp_path / "checkpoint_best.pth"
    m.save(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"perturbation"} and raw["perturbation"].shape == (3, 32, 32)
    assert raw["perturbation"].dtype == torch.float32
    m2 = VisualPrompt(canvas_size=32, checkpoint=str(path))
    assert torch.equal(m2.perturbation.detach(), m.perturbation.detach())


def test_bad_prompt_files_are_rejected(tmp_path):
    torch.save({"delta": torch.zeros(3, 32, 32)}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="'perturbation'"):
        load_prompt(tmp_path / "a.pth")
    torch.save({"perturbation": torch.zeros(3, 32, 30)}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"\[3, S, S\]"):
        load_prompt(tmp_path / "b.pth")
    save_prompt(torch.zeros(3, 224, 224), tmp_path / "c.pth")
    with pytest.raises(ValueError, match="224x224 but this canvas is 32x32"):
        VisualPrompt(canvas_size=32, checkpoint=str(tmp_path / "c.pth"))
    (tmp_path / "d.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        load_prompt(tmp_path / "d.pth")
    with pytest.raises(FileNotFoundError):
        load_prompt(tmp_path / "missing.pth")


def test_loaded_prompt_is_masked_to_the_frame(tmp_path):
    save_prompt(torch.ones(3, 32, 32), tmp_path / "full.pth")
    with pytest.warns(UserWarning, match="masking"):
        m = VisualPrompt(canvas_size=32, checkpoint=str(tmp_path / "full.pth"))
    assert torch.equal(m.perturbation.detach(), frame_mask(32, 4))


# ---------------------------------------------------------------------------- counting data
def test_counting_scene_places_n_separate_objects():
    from prompttune.data.counting import counting_scene
    from prompttune.data.world import render

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4):
        for _ in range(5):
            objs = counting_scene(rng, n)
            assert len(objs) == n and len({(o.category, o.subcategory, o.color) for o in objs}) == 1
            for i in range(n):
                for j in range(i):
                    d = math.hypot(objs[i].cx - objs[j].cx, objs[i].cy - objs[j].cy)
                    assert d > objs[i].radius + objs[j].radius
            _, masks = render(objs, 32, rng)
            assert all(m.sum() > 0 for m in masks)  # every object visible


def test_counting_writer_layout_is_read_by_image_folder(tmp_path):
    from prompttune.data.image_folder import ImageFolderDataModule

    spec = {"kind": "counting", "n_train": 2, "n_val": 1, "n_test": 2, "side": 32, "seed": 0, "max_count": 4}
    dm = ImageFolderDataModule(root=str(tmp_path / "count"), split_file="split_prompttune_count.json",
                               synthetic=spec, batch_size=4)
    dm.check()
    assert dm.info() == {"classnames": ["one", "two", "three", "four"], "num_classes": 4}
    dm.build()
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["test"]) == 8
    assert (tmp_path / "count" / "images" / "three" / "test_0001.png").is_file()


def test_counting_writer_rejects_bad_max_count(tmp_path):
    from prompttune.data.base import DataError
    from prompttune.data.counting import write_counting

    with pytest.raises(DataError, match="max_count"):
        write_counting(tmp_path, max_count=9)


# ---------------------------------------------------------------------------- the TSE model (issue 13 item 17)
def test_tse_on_the_source_is_refused_unless_opted_in(clip):
    x, y = _batch()
    with pytest.raises(ValueError, match="needs a separate CLIP for TSE"):
        _method(clip, TransferableVisualPrompt, tse=0.1)
    with pytest.warns(UserWarning, match="TSE ON THE SOURCE MODEL"):
        m = _method(clip, TransferableVisualPrompt, tse=0.1, tse_on_source=True)
    assert m.scorer("tse") is m.scorer("source")
    # tse = 0 (vp) needs no TSE model at all
    assert "tse" not in _method(clip)._scorers


def test_tse_checks_at_compose_time():
    from prompttune.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"method.tse=0.001 with method.tse_backbone=null"):
        compose(None, ["method=tvp", "method.tse_backbone=null"])
    with pytest.raises(ConfigError, match="is the source backbone itself"):
        compose(None, ["method=tvp", "backbone=zoo_clip_s2"])
    cfg = compose(None, ["method=tvp", "method.tse_backbone=null", "method.tse_on_source=true"])
    assert cfg.method.tse_on_source is True
    # the shipped default names a separate zoo CLIP; the paper card names OpenAI's ViT-B/32
    assert compose(None, ["method=tvp"]).method.tse_backbone == "zoo_clip_s2"
    card = compose(REPO / "experiments/paper/tvp_cifar10.yaml")
    assert card.method.tse_backbone == "clip_vit_b32" and card.method.tse == 0.001 and card.method.fca == 0.005


def test_default_tvp_builds_a_separate_tse_model_with_the_source_weights_setting(clip):
    """setup() with the shipped config builds the TSE CLIP from its own config (zoo_clip_s2), with
    the source's `weights` (random here: no zoo build), and it is a different model."""
    from prompttune.config import compose
    from prompttune.runs import kwargs_of

    cfg = compose(None, ["method=tvp"])
    m = TransferableVisualPrompt(**{**kwargs_of(cfg, "method"), "canvas_size": 32})
    m.bind(clip, CLASSES)
    tse = m.scorer("tse").backbone
    assert tse is not clip and tse.name == "zoo:clip-tiny-s2(random)"
    assert not torch.equal(tse.model.token_embedding.weight, clip.model.token_embedding.weight)


def _official_tvp_step(delta, mask, clean, labels, task_loss, embed, tse_sim, fca, tse, lr):
    """My transcription of the official update (transfer_cls.py:537-595): the perturbation is
    repeated over the batch (noise), the loss is task + fca * mean ||E(x+noise) - E(x)|| - tse * TSE,
    then noise.grad is averaged over the batch, L2-normalised over the whole canvas, masked to the
    frame and subtracted with step lr."""
    delta = delta.detach().clone().requires_grad_(True)
    noise = delta.repeat(clean.shape[0], 1, 1, 1)
    noise.retain_grad()
    images = clean + noise
    loss = task_loss(images)
    if fca > 0:
        loss = loss + fca * torch.norm(embed(images) - embed(clean).detach(), dim=-1).mean()
    if tse > 0:
        loss = loss - tse * tse_sim(images)
    loss.backward()
    g = noise.grad.mean(0).squeeze(0)
    scaled = g / (torch.norm(g.view(-1), dim=0).view(1, 1, 1) + 1e-10)
    return delta.detach() - scaled * mask * lr


def test_tvp_update_matches_the_official_transcription(clip, tse_clip):
    m = _method(clip, TransferableVisualPrompt, fca=0.3, tse=0.2, tse_backbone=tse_clip)
    x, y = _batch()
    with torch.no_grad():
        m.perturbation.copy_(torch.randn_like(m.perturbation) * 0.1 * m.mask)  # a non-trivial prompt
    src, tse_s = m.scorer("source"), m.scorer("tse")
    texts = [f"this is a photo of a {CLASSES[int(c)]}" for c in y]
    want = _official_tvp_step(
        m.perturbation, m.mask, pad_image(x, 32, 24), y,
        task_loss=lambda im: src.task_loss(im, y, CLASSES), embed=src.embed,
        tse_sim=lambda im: tse_s.text_similarity(im, texts).mean(), fca=0.3, tse=0.2, lr=1.5)
    m.prompt_step(x, y, lr=1.5)
    torch.testing.assert_close(m.perturbation.detach(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- transfer targets (evaluation only)
def test_transfer_targets_are_checked_before_compute():
    from omegaconf import OmegaConf

    from prompttune.config import ConfigError

    with pytest.raises(ValueError, match="transfer_targets"):
        VisualPrompt(transfer_targets="zoo_clip_p8")
    with pytest.raises(ConfigError, match=r"transfer_targets names \['zoo_clip_typo'\]"):
        VisualPrompt.check_config(OmegaConf.create({"method": {"transfer_targets": ["zoo_clip_typo"]}}))
    with pytest.raises(ConfigError, match="expected a list"):
        VisualPrompt.check_config(OmegaConf.create({"method": {"transfer_targets": "zoo_clip_p8"}}))
    with pytest.raises(ConfigError, match="the TSE model 'zoo_clip_s2'"):
        TransferableVisualPrompt.check_config(OmegaConf.create(
            {"method": {"tse": 0.001, "tse_backbone": "zoo_clip_s2", "transfer_targets": ["zoo_clip_s2"]}}))
    VisualPrompt.check_config(OmegaConf.create({"method": {"transfer_targets": ["zoo_clip_p8"]}}))  # valid


def test_transfer_scores_are_recorded_per_item_at_evaluation_only(clip):
    """The target scores the source's prompted canvas; the forward's per-item correctness goes
    through the task to the split's items (index from the batch) and its mean to the metrics;
    a training forward carries none."""
    from prompttune.tasks.classification import ClassificationTask

    torch.manual_seed(1)
    other = CLIPBackbone(zoo_entry="clip-tiny", weights="random")
    m = _method(clip)
    m.transfer_targets = ["same", "other"]
    m._scorers["target:same"] = CLIPScorer(clip)  # the source itself: must agree with the task's acc
    m._scorers["target:other"] = CLIPScorer(other)
    task = ClassificationTask({"num_classes": 4})
    m.eval()
    x, y = _batch(6)
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    batch = {"image": (x - mean) / std, "label": y, "index": torch.arange(10, 16)}
    task.update(m(clip, batch), batch, "test")
    metrics = task.compute("test")
    items = task.take_items("test")
    assert items["n"] == 6 and items["index"] == list(range(10, 16))
    s = items["scores"]
    assert s["transfer_acc/same"] == s["acc"]
    want_other = (CLIPScorer(other).class_scores(pad_image(x, 32, 24), CLASSES).argmax(-1) == y).float().tolist()
    assert s["transfer_acc/other"] == want_other
    assert s["transfer_acc"] == [(a + b) / 2 for a, b in zip(s["acc"], want_other)]
    assert metrics["transfer_acc"] == pytest.approx(sum(s["transfer_acc"]) / 6)
    assert metrics["transfer_acc/same"] == pytest.approx(metrics["acc"])
    m.train()
    assert "item_scores" not in m(clip, batch)  # training: the targets are never run
