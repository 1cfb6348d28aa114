"""Visual ICL against the official protocol: the uint8 metric chain, to_rectangle, training
targets and input normalisation, checkpoint loading. Parity is checked against transcriptions of
the official computations written for these tests (none of the official code is in the repo)."""

from __future__ import annotations

import prompttune._tvshim  # noqa: F401

import numpy as np
import pytest
import torch

from prompttune.tasks.icl_segmentation import (ICLSegmentationTask, iou_and_acc, largest_component_box,
                                               official_iou_and_acc, official_round_white)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ------------------------------------------------------------------ transcriptions (HWC, as the official code)
def _official_round_image(img_uint8_hwc: np.ndarray) -> torch.Tensor:
    """Bar et al. / InMeMo ``round_image(img, [WHITE, BLACK])``, fed an np.uint8 HWC image."""
    img = torch.tensor(img_uint8_hwc)
    t = torch.tensor((0, 0, 0)).to(img)
    options = torch.tensor([(255, 255, 255), (0, 0, 0)])
    opts = options.view(2, 1, 1, 3).permute(1, 2, 3, 0).to(img)
    nn_ = (((img + t).unsqueeze(-1) - opts) ** 2).float().mean(dim=2)
    return options[torch.argmin(nn_, dim=-1)]


def _official_calc_metric(ours: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    fg = np.array((255, 255, 255))
    accuracy = np.sum(np.float32((target == ours).all(axis=2))) / (ours.shape[0] * ours.shape[1])
    seg_orig = ((target - fg[np.newaxis, np.newaxis, :]) == 0).all(axis=2)
    seg_our = ((ours - fg[np.newaxis, np.newaxis, :]) == 0).all(axis=2)
    with np.errstate(invalid="ignore"):
        iou = np.sum(np.float32(seg_orig & seg_our)) / np.sum(np.float32(seg_orig | seg_our))
    return float(iou), float(accuracy)


def _official_episode(pred01_chw: torch.Tensor, label01_chw: torch.Tensor) -> tuple[float, float]:
    """One episode of val_vp_segmentation.py on one cell: pred = trunc(clip(y*255)); label
    normalised in float32 on the device, de-normalised with numpy float64 stats; both np.uint8."""
    pred = np.uint8(torch.clip(pred01_chw.permute(1, 2, 0) * 255, 0, 255).int().numpy())
    m32, s32 = torch.tensor(MEAN, dtype=torch.float32), torch.tensor(STD, dtype=torch.float32)
    lab = (label01_chw - m32[:, None, None]) / s32[:, None, None]
    lab = torch.einsum("chw->hwc", lab)
    lab = np.uint8(torch.clip((lab * STD + MEAN) * 255, 0, 255).int().numpy())
    return _official_calc_metric(_official_round_image(pred).numpy(), _official_round_image(lab).numpy())


def _bfs_to_rectangle(white: np.ndarray) -> np.ndarray:
    """``to_rectangle`` with an independent 8-connected BFS (cv2.connectedComponents' default)."""
    h, w = white.shape
    seen = np.zeros_like(white, dtype=bool)
    best: list[tuple[int, int]] = []
    for y in range(h):
        for x in range(w):
            if white[y, x] and not seen[y, x]:
                comp, stack = [], [(y, x)]
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    comp.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and white[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                stack.append((ny, nx))
                if len(comp) > len(best):
                    best = comp
    out = np.zeros_like(white, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[min(ys):max(ys) + 1, min(xs):max(xs) + 1] = True
    return out


# ------------------------------------------------------------------ the metric chain
def test_official_rounding_wraps_128_grey_levels():
    g = torch.arange(256)
    levels = g.view(1, 1, 256).expand(3, 1, 256)
    white = official_round_white(levels)[0]
    hand = torch.tensor([((v + 1) ** 2 % 256) <= (v ** 2 % 256) for v in range(256)])  # uint8 wrap, ties -> white
    assert torch.equal(white, hand)
    assert int((white != (g >= 128)).sum()) == 128
    assert bool(white[15]) and not bool(white[240]) and bool(white[255]) and not bool(white[0])
    # against the HWC transcription, colour pixels included
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    ref = (_official_round_image(img) == 255).all(-1)
    ours = official_round_white(torch.from_numpy(img).permute(2, 0, 1).int())
    assert torch.equal(ours, ref)


def test_miou_official_matches_the_transcribed_chain_on_grey_masks():
    """Hand-made masks with grey levels (bicubic edges, washed-out predictions), compared per
    episode with the transcription; the correct metric differs where grey levels wrap."""
    gen = torch.Generator().manual_seed(0)
    b, c = 6, 31
    target = torch.zeros(b, 3, c, c)
    target[:, :, 8:24, 6:20] = 1.0
    target[:, :, 7, 6:20] = 0.6  # grey edges, as a bicubic-resized label has
    target[:, :, 24, 6:20] = 200 / 255
    pred = (target * 0.8 + 0.3 * torch.rand(b, 3, c, c, generator=gen)).clamp(0, 1)
    pred[0] = 240 / 255  # all grey 240: correct rounding says white, the official chain black
    pred[1] = 15 / 255  # all grey 15: black correctly, white officially
    iou_o, acc_o = official_iou_and_acc(pred, target)
    for i in range(b):
        ref_iou, ref_acc = _official_episode(pred[i], target[i])
        assert float(iou_o[i]) == pytest.approx(ref_iou, abs=1e-6), i
        assert float(acc_o[i]) == pytest.approx(ref_acc, abs=1e-6), i
    iou_c, _ = iou_and_acc(pred, target)
    assert float(iou_c[0]) > 0.2 and float(iou_o[0]) == 0.0  # 240 is white (correct), black (official)
    assert float(iou_c[1]) == 0.0 and float(iou_o[1]) > 0.2
    assert not torch.allclose(iou_c, iou_o)


def test_both_empty_is_one_for_miou_and_nan_for_the_official_chain():
    z = torch.zeros(1, 3, 8, 8)
    assert float(iou_and_acc(z, z)[0]) == 1.0
    assert np.isnan(float(official_iou_and_acc(z, z)[0]))
    assert np.isnan(_official_episode(z[0], z[0])[0])
    task = ICLSegmentationTask()
    full = torch.ones(1, 3, 8, 8)
    task.update({"pred_cell": torch.cat([z, full]), "true_cell": torch.cat([z, full])}, {}, "test")
    res = task.compute("test")
    assert res["miou"] == 1.0 and np.isnan(res["miou_official"]) and res["official_nan_episodes"] == 1.0
    assert res["acc"] == 1.0 and res["acc_official"] == 1.0


def test_to_rectangle_boxes_the_largest_component_for_detection_only():
    rng = np.random.default_rng(1)
    fg = torch.zeros(3, 20, 20, dtype=torch.bool)
    fg[0, 2:5, 2:5] = True  # 9 px
    fg[0, 10:16, 8:11] = True  # 18 px, the largest
    fg[0, 16, 11] = True  # diagonal neighbour: same component under 8-connectivity
    fg[1] = torch.from_numpy(rng.random((20, 20)) < 0.3)
    out = largest_component_box(fg)
    for i in range(3):
        assert np.array_equal(out[i].numpy(), _bfs_to_rectangle(fg[i].numpy())), i
    assert out[0, 10:17, 8:12].all() and int(out[0].sum()) == 7 * 4 and not out[2].any()
    # the task boxes predictions only for detection data
    target = torch.zeros(1, 3, 20, 20)
    target[..., 10:17, 8:12] = 1
    pred = fg[:1].unsqueeze(1).expand(1, 3, 20, 20).float()
    seg, det = ICLSegmentationTask(), ICLSegmentationTask({"kind": "detection"})
    for t in (seg, det):
        t.update({"pred_cell": pred, "true_cell": target}, {}, "test")
    assert det.compute("test")["miou_official"] > seg.compute("test")["miou_official"]
    assert det.compute("test")["miou"] == seg.compute("test")["miou"]


# ------------------------------------------------------------------ training targets and normalisation
TINY = {"mae": {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                "decoder_num_heads": 2}}


def test_official_target_norm_tokenises_the_washed_out_canvas():
    from prompttune.backbones.mae_vqgan import MAEVQGANBackbone

    torch.manual_seed(0)
    bb = MAEVQGANBackbone(arch="tiny", weights="random", overrides=TINY)
    seen = []
    h = bb.model.vqgan.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    x = torch.zeros(1, 3, 64, 64)
    x[..., :, 32:] = 1.0
    bb.tokenize(x)
    bb.tokenize(x, official_unnormalised=True)
    h.remove()
    assert float(seen[0].min()) == -1.0 and float(seen[0].max()) == 1.0
    # vqgan.py map_pixels on an un-normalised canvas: 2 * (x * std + mean) - 1
    ref = 2 * (x * torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
               + torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)) - 1
    assert torch.allclose(seen[1], ref, atol=1e-6)
    assert float(seen[1].min()) == pytest.approx(-0.188, abs=1e-3) and float(seen[1].max()) == pytest.approx(0.428, abs=1e-3)


@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_official_train_norm_feeds_the_mae_unnormalised_canvases_in_training_only(flags):
    from prompttune.backbones.mae_vqgan import MAEVQGANBackbone
    from prompttune.registry import METHODS

    torch.manual_seed(0)
    bb = MAEVQGANBackbone(arch="tiny", weights="random", overrides=TINY)
    m = METHODS.get("inmemo")(official_target_norm=flags[0], official_train_norm=flags[1])
    m.build_prompters(bb.geometry)
    m.geom = bb.geometry
    c = bb.geometry.cell
    batch = {"support_image": torch.rand(2, 3, c, c), "support_mask": torch.ones(2, 3, c, c),
             "query_image": torch.rand(2, 3, c, c), "query_mask": torch.zeros(2, 3, c, c)}
    seen = []
    h = bb.model.mae.patch_embed.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
    m.train()
    out_train = m(bb, batch)
    m.eval()
    m(bb, batch)
    h.remove()
    canvas = out_train["canvas"]
    norm = (canvas - bb._mean) / bb._std
    assert torch.allclose(seen[0], canvas if flags[1] else norm, atol=1e-6)
    assert torch.allclose(seen[1], norm, atol=1e-6)  # evaluation always normalises
    from prompttune.data.canvas import build_canvas

    label = build_canvas(bb.geometry, "a1", batch["support_image"], batch["support_mask"], batch["query_image"],
                         batch["query_mask"])
    assert torch.equal(out_train["target"], bb.tokenize(label, official_unnormalised=flags[0]))


def test_method_check_config_rejects_bad_values():
    from prompttune import config

    with pytest.raises(config.ConfigError, match=r"method.arrangement='a9'.*valid: a1, a2"):
        config.compose("experiments/smoke.yaml", ["method=inmemo", "method.arrangement=a9"])
    with pytest.raises(config.ConfigError, match=r"data.support_class='last'; valid: official, first"):
        config.compose("experiments/smoke.yaml", ["method=no_prompt", "data.support_class=last"])
    with pytest.raises(config.ConfigError, match=r"select=val needs a validation split.*data.val_fraction"):
        config.compose("experiments/smoke.yaml", ["method=no_prompt", "select=val"])
    with pytest.raises(config.ConfigError, match=r"data.val_fraction=1.5 must be a number in \[0, 1\)"):
        config.compose("experiments/smoke.yaml", ["method=no_prompt", "data.val_fraction=1.5"])


# ------------------------------------------------------------------ checkpoints
def test_run_checkpoints_load_weights_only_and_other_files_are_rejected(tmp_path):
    from prompttune.data.canvas import CanvasGeometry
    from prompttune.methods._icl import load_method_checkpoint
    from prompttune.registry import METHODS

    src = METHODS.get("inmemo")()
    src.build_prompters(CanvasGeometry(64, 8, 1))
    dst = METHODS.get("inmemo")()
    dst.build_prompters(CanvasGeometry(64, 8, 1))
    torch.save({"state_dict": {f"method.{k}": v for k, v in src.state_dict().items()}, "epoch": 3},
               tmp_path / "last.ckpt")
    load_method_checkpoint(dst, tmp_path / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    load_method_checkpoint(dst, tmp_path / "m.safetensors")

    class Payload:  # anything that needs unpickling code is refused, never executed
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": {}, "evil": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"could not load .*evil.ckpt as a weights-only checkpoint"):
        load_method_checkpoint(dst, tmp_path / "evil.ckpt")
    other = METHODS.get("inmemo")(pad=3)
    other.build_prompters(CanvasGeometry(64, 8, 1))
    torch.save({"state_dict": {f"method.{k}": v for k, v in other.state_dict().items()}}, tmp_path / "shape.ckpt")
    with pytest.raises(ValueError, match=r"shape.ckpt does not fit InMeMo: it holds .*pad_up.*expects"):
        load_method_checkpoint(dst, tmp_path / "shape.ckpt")
    import prompttune.methods._icl as icl_mod
    import inspect

    assert "weights_only=False" not in inspect.getsource(icl_mod)
