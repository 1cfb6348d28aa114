"""Which pooling, normalisation and drop-path a ViT weight gets, decided from what the weights are
(issue 13, items 8, 9, 13): checkpoint layouts, hub tags, user overrides, the run record."""

from __future__ import annotations

import pytest
import torch

from prompttune.backbones import vit as vitmod
from prompttune.backbones.vit import (IMAGENET_MEAN, IMAGENET_STD, ViTBackbone, has_mae_pos_embed,
                                      inspect_checkpoint, mae_sincos_pos_embed)

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def encoder_state(mae_pos: bool = False) -> dict[str, torch.Tensor]:
    """A CLS-pooling timm ViT's weights (final `norm`, no fc_norm, no head), random but fixed."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    m = VisionTransformer(num_classes=0, global_pool="token", **TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
        if mae_pos:
            m.pos_embed.copy_(mae_sincos_pos_embed(32, 4))
    return {k: v.clone() for k, v in m.state_dict().items()}


def load(tmp_path, obj, name="w.pth", **kw) -> ViTBackbone:
    path = tmp_path / name
    torch.save(obj, path)
    return ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, checkpoint=str(path), **kw)


def test_mae_sincos_matches_a_transcription_of_maes_numpy_code():
    # MAE util/pos_embed.py: meshgrid(w, h) -> first half of the channels encodes grid[0] (the column)
    import numpy as np

    dim, g = 16, 3
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0).reshape(2, 1, g, g)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    want = np.concatenate([np.zeros([1, dim]), np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], 1)])
    torch.testing.assert_close(mae_sincos_pos_embed(dim, g)[0], torch.from_numpy(want).float())


@pytest.mark.parametrize("layout,fmt,pool", [
    ("mae_encoder_wrapped", "mae", "avg"),       # mae_pretrain_vit_base.pth: {"model": encoder}, sin-cos positions
    ("mae_with_decoder", "mae", "avg"),
    ("in21k_wrapped_with_head", "timm", "cls"),  # a supervised ViT saved as {"model": ...}: not MAE
    ("wrapped_no_head_learned_pos", "timm", "cls"),
    ("fc_norm_finetuned", "timm", "avg"),
    ("moco", "moco", "cls"),
])
def test_pooling_is_decided_by_the_weights_not_the_wrapper(tmp_path, layout, fmt, pool):
    enc = encoder_state(mae_pos=layout.startswith("mae"))
    if layout == "mae_encoder_wrapped":
        obj = {"model": enc}
    elif layout == "mae_with_decoder":
        obj = {"model": {**enc, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(8, 32)}}
    elif layout == "in21k_wrapped_with_head":
        obj = {"model": {**enc, "head.weight": torch.zeros(21843, 32), "head.bias": torch.zeros(21843)}}
    elif layout == "wrapped_no_head_learned_pos":
        obj = {"model": enc}
    elif layout == "fc_norm_finetuned":
        sd = {k: v for k, v in enc.items() if not k.startswith("norm.")}
        sd.update({"fc_norm.weight": enc["norm.weight"], "fc_norm.bias": enc["norm.bias"],
                   "head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)})
        obj = {"model": sd}
    else:
        obj = {"state_dict": {f"module.base_encoder.{k}": v for k, v in enc.items()}}
    got_fmt, got_pool, why = inspect_checkpoint(tmp_path / "x.pth", obj)
    assert (got_fmt, got_pool) == (fmt, pool), why
    bb = load(tmp_path, obj)
    assert bb.pool == pool and bb.record()["pool"] == pool and bb.record()["provenance"] == why
    final_norm = bb.model.fc_norm if pool == "avg" else bb.model.norm
    assert torch.equal(final_norm.weight, enc["norm.weight"])  # the pretrained norm is kept, wherever it goes
    # the pooled feature by hand: mean of the non-CLS tokens then the norm, or the norm then CLS
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = bb.model.blocks(bb.embed_tokens(x))
        ln = lambda v: torch.nn.functional.layer_norm(v, (32,), enc["norm.weight"], enc["norm.bias"], eps=1e-6)  # noqa: E731
        want = ln(t[:, 1:].mean(1)) if pool == "avg" else ln(t)[:, 0]
        torch.testing.assert_close(bb.encode_image(x), want)


def test_mae_pos_embed_check_rejects_learned_embeddings():
    assert has_mae_pos_embed({"pos_embed": mae_sincos_pos_embed(32, 4)})
    assert not has_mae_pos_embed({"pos_embed": torch.randn(1, 17, 32) * 0.02})
    assert not has_mae_pos_embed({})


def test_user_pool_override_moves_the_norm_and_is_recorded(tmp_path):
    enc = encoder_state(mae_pos=True)
    bb = load(tmp_path, {"model": enc}, pool="cls")
    assert bb.pool == "cls" and "user override" in bb.record()["pool_source"]
    assert torch.equal(bb.model.norm.weight, enc["norm.weight"])
    assert isinstance(bb.model.fc_norm, torch.nn.Identity)
    bb2 = load(tmp_path, {"model": {**enc, "head.weight": torch.zeros(3, 32)}}, name="sup.pth", pool="avg")
    assert bb2.pool == "avg" and torch.equal(bb2.model.fc_norm.weight, enc["norm.weight"])


def test_imagenet_statistics_for_every_vit_weight(tmp_path):
    enc = encoder_state()
    for obj in ({"model": enc}, {"state_dict": {f"module.base_encoder.{k}": v for k, v in enc.items()}}):
        bb = load(tmp_path, obj)
        assert (bb.mean, bb.std) == (IMAGENET_MEAN, IMAGENET_STD)
    bb = load(tmp_path, {"model": enc}, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert bb.mean == (0.5, 0.5, 0.5) and "user override" in bb.record()["norm_source"]
    from prompttune.config import ConfigError

    with pytest.raises(ConfigError, match=r"backbone.std=\[0.5, 0.0, 0.5\]: expected three numbers"):
        load(tmp_path, {"model": enc}, std=[0.5, 0.0, 0.5])


@pytest.mark.parametrize("tag,pool", [("augreg_in21k", "cls"), ("mae", "avg")])
def test_hub_weights_same_rule_as_files(monkeypatch, tag, pool):
    """The hub route (downloads, so faked here): in21k's pretrained_cfg says mean/std 0.5, but the
    ViT rule is ImageNet statistics, as the same weights from a file; `pretrained: mae` pools as MAE."""
    timm = vitmod._timm()
    real = timm.create_model

    def fake_create(name, pretrained=False, **kw):
        assert pretrained and name == f"vit_tiny_patch16_224.{tag}"
        m = real("vit_tiny_patch16_224", pretrained=False, **kw)
        m.pretrained_cfg = {"tag": tag, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        return m

    monkeypatch.setattr(timm, "create_model", fake_create)
    bb = ViTBackbone(model="vit_tiny_patch16_224", pretrained=tag, model_kwargs=TINY)
    assert (bb.mean, bb.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert bb.pool == pool and tag in bb.provenance
    if pool == "avg":
        assert isinstance(bb.model.norm, torch.nn.Identity) and isinstance(bb.model.fc_norm, torch.nn.LayerNorm)


def test_drop_path_is_active_in_training_only():
    from timm.layers import DropPath

    torch.manual_seed(0)
    bb = ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, weights="random", drop_path_rate=0.5)
    drops = [m for m in bb.model.modules() if isinstance(m, DropPath)]
    assert len(drops) == 2 and drops[-1].drop_prob == pytest.approx(0.5)  # linear to the rate at the last block
    x = torch.randn(4, 3, 16, 16)
    bb.train()
    assert all(d.training for d in drops) and not bb.training and not bb.model.blocks[0].attn.training
    with torch.no_grad():
        a, b = bb.encode_image(x), bb.encode_image(x)
    assert not torch.allclose(a, b)  # stochastic depth acts
    bb.eval()
    assert not any(d.training for d in drops)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(x), bb.encode_image(x))
    assert not any(p.requires_grad for p in bb.parameters())
    none = ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, weights="random")
    assert not [m for m in none.model.modules() if isinstance(m, DropPath)]
    from prompttune.config import ConfigError

    with pytest.raises(ConfigError, match=r"backbone.drop_path_rate=1.5: expected a number in \[0, 1\)"):
        ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, weights="random", drop_path_rate=1.5)
