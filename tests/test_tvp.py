"""TVP / VP: frame geometry, the official normalised-gradient step, FCA / TSE terms, gradients
reaching only the perturbation, losses that fall, the official prompt file format, and the
synthetic counting data. Tiny random-weight CLIPs only."""

from __future__ import annotations

import math

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


def test_fca_and_tse_terms(clip):
    m = _method(clip, TransferableVisualPrompt, fca=0.5, tse=0.1)
    x, y = _batch()
    loss, parts = m.objective(x, y)
    assert parts["fca"] == pytest.approx(0.0, abs=1e-4)  # delta = 0: prompted == clean
    # TSE against a hand computation: logit_scale (clamped at 100) * cos(image, text)
    s = CLIPScorer(clip)
    clean = pad_image(x, 32, 24)
    img = F.normalize(clip.encode_image(s.prepare(clean)), dim=-1)
    txt = F.normalize(clip.encode_text(clip.tokenize([f"this is a photo of a {CLASSES[i]}" for i in y])), dim=-1)
    want = (clip.logit_scale.clamp(max=100) * (img * txt).sum(-1)).mean()
    assert parts["tse"] == pytest.approx(want.item(), rel=1e-4)
    assert loss.item() == pytest.approx(parts["task"] + 0.5 * parts["fca"] - 0.1 * parts["tse"], rel=1e-5)
    m.prompt_step(x, y, lr=1.0)
    _, parts2 = m.objective(x, y)
    assert parts2["fca"] > 0  # the prompted embedding now differs from the clean one


def test_tse_gradient_changes_the_update(clip):
    x, y = _batch()
    a, b = _method(clip), _method(clip, TransferableVisualPrompt, fca=0.0, tse=5.0)
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
