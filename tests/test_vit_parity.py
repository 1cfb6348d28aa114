"""Parity of prompttune's VPT / SPT with transcriptions of the official computations, on tiny random
weights loaded through the real checkpoint formats (MAE ``{"model": ...}``, MoCo-v3 ``module.base_encoder.``).

The transcriptions below are written for this test from reading the official code (nothing is
copied): SPT ``Models/MAE_vpt.py`` / ``MAE_vpt_deep.py`` (MAE: mean over every token after CLS,
prompts included, then the pretrained ``norm``) and ``Models/vpt.py`` / ``vpt_deep.py`` (``norm``
then CLS), ``train_MAE.py``'s ``prompt_generator`` window pooling; VPT
``src/models/vit_prompt/vit.py`` ``incorporate_prompt`` / ``forward_deep_prompt`` (prompt dropout
after ``expand``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prompttune.backbones.vit import ViTBackbone, mae_sincos_pos_embed
from prompttune.methods._vit_prompts import window_pool
from prompttune.methods.spt import SPT
from prompttune.methods.vpt import VPT
from test_vpt_spt import TinyData

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
D, DEPTH, P = 32, 3, 4


def source_vit() -> nn.Module:
    """The 'pretrained' encoder: a CLS-pooling timm ViT with a final `norm`, random weights, MAE positions."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(11)
    m = VisionTransformer(num_classes=0, global_pool="token", **TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        m.pos_embed.copy_(mae_sincos_pos_embed(D, 4))
    return m.eval()


def backbone_from(tmp_path, src: nn.Module, kind: str) -> ViTBackbone:
    sd = src.state_dict()
    obj = {"model": dict(sd)} if kind == "mae" else {"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}
    path = tmp_path / f"{kind}.pth"
    torch.save(obj, path)
    return ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, checkpoint=str(path))


# ------------------------------------------------------------------ transcriptions of the official forward passes
def spt_official_features(src: nn.Module, x: torch.Tensor, prompt_token: torch.Tensor, deep: bool,
                          global_pool: bool) -> torch.Tensor:
    """SPT PromptVisionTransformer.forward_features (shallow: prompt_token [1, P, D]; deep: [depth, P, D])."""
    b = x.shape[0]
    x = src.patch_embed(x)
    x = torch.cat((src.cls_token.expand(b, -1, -1), x), dim=1)
    x = x + src.pos_embed
    first = prompt_token[0].unsqueeze(0) if deep else prompt_token
    x = torch.cat((x[:, :1], first.expand(b, -1, -1), x[:, 1:]), dim=1)
    for i, blk in enumerate(src.blocks):
        if deep and i > 0:
            x = torch.cat((x[:, :1], prompt_token[i].unsqueeze(0).expand(b, -1, -1), x[:, 1 + P:]), dim=1)
        x = blk(x)
    if global_pool:
        return src.norm(x[:, 1:].mean(dim=1))
    return src.norm(x)[:, 0]


def vpt_official_features(src: nn.Module, x: torch.Tensor, shallow: torch.Tensor, deep_prompts: torch.Tensor | None,
                          dropout: nn.Dropout) -> torch.Tensor:
    """VPT PromptedTransformer: incorporate_prompt, then forward_deep_prompt (or the plain encoder), encoder_norm, CLS."""
    b = x.shape[0]
    emb = src.patch_embed(x)
    emb = torch.cat((src.cls_token.expand(b, -1, -1), emb), dim=1) + src.pos_embed
    h = torch.cat((emb[:, :1], dropout(shallow.expand(b, -1, -1)), emb[:, 1:]), dim=1)
    for i, blk in enumerate(src.blocks):
        if i > 0 and deep_prompts is not None and i <= deep_prompts.shape[0]:
            h = torch.cat((h[:, :1], dropout(deep_prompts[i - 1].expand(b, -1, -1)), h[:, 1 + P:]), dim=1)
        h = blk(h)
    return src.norm(h)[:, 0]


def official_window_pool(x: torch.Tensor, num_prompts: int, kind: str) -> torch.Tensor:
    """train_MAE.py prompt_generator, mean/max pooling branch, for one layer: [P * B, D] candidates."""
    b, n, d = x.shape
    window = n // (num_prompts - 1)
    remain = n % window
    pro = []
    for j in range(num_prompts - 1):
        w = x[:, j * window:(j + 1) * window]
        pro.append(w.mean(dim=1) if kind == "mean_pooling" else w.max(dim=1).values)
    last = x[:, -remain:]
    pro.append(last.mean(dim=1) if kind == "mean_pooling" else last.max(dim=1).values)
    return torch.stack(pro).reshape(-1, d)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["mae", "moco"])
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("cls", [VPT, SPT])
def test_logits_and_gradients_match_the_official_spt_models(tmp_path, kind, deep, cls):
    src = source_vit()
    bb = backbone_from(tmp_path, src, kind)
    assert bb.pool == ("avg" if kind == "mae" else "cls")
    data = TinyData(n=8, batch_size=8)
    m = cls(num_prompts=P, deep=deep)
    m.setup(bb, data)
    x, y = data.images[:6], data.labels[:6]
    out = m(bb, {"image": x})["logits"]
    nn.functional.cross_entropy(out, y).backward()

    prompt = m.prompts.detach().clone().requires_grad_(True)
    w, b = m.head.weight.detach().clone().requires_grad_(True), m.head.bias.detach().clone().requires_grad_(True)
    for p in src.parameters():
        p.requires_grad_(False)
    feats = spt_official_features(src, x, prompt if deep else prompt[:1], deep, global_pool=(kind == "mae"))
    ref = feats @ w.T + b
    nn.functional.cross_entropy(ref, y).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.prompts.grad, prompt.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.head.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.head.bias.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompt_dropout_matches_vpt_per_sample_masks(tmp_path, deep):
    src = source_vit()
    bb = backbone_from(tmp_path, src, "moco")  # VPT's supervised/MoCo setting: CLS pooling
    m = VPT(num_prompts=P, deep=deep, prompt_dropout=0.5)
    m.setup(bb, TinyData(n=8, batch_size=8))
    m.train()
    x = TinyData(n=8).images[:5]
    torch.manual_seed(123)
    ours = m(bb, {"image": x})["logits"]
    torch.manual_seed(123)  # the same draws in the same order: the official code expands, then drops
    drop = nn.Dropout(0.5).train()
    pr = m.prompts.detach()
    feats = vpt_official_features(src, x, pr[:1], pr[1:] if deep else None, drop)
    torch.testing.assert_close(ours, m.head(feats), rtol=1e-5, atol=1e-5)


def test_prompt_dropout_draws_a_mask_per_sample():
    bb = ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, weights="random", pool="cls")
    m = VPT(num_prompts=P, prompt_dropout=0.5)
    m.setup(bb, TinyData(n=8, batch_size=8))
    seen = {}
    first = bb.model.blocks[0]
    first.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    m.train()
    x = torch.zeros(6, 3, 16, 16)  # identical images: any spread across samples is the dropout mask's
    m(bb, {"image": x})
    prompts_in = seen["x"][:, 1:1 + P]
    assert prompts_in.std(dim=0).max() > 0  # per-sample masks (it was 0 with the mask drawn before expand)
    zeros = (prompts_in == 0).float().mean()
    assert 0.3 < zeros < 0.7
    m.eval()
    m(bb, {"image": x})
    assert seen["x"][:, 1:1 + P].std(dim=0).max() == 0  # no dropout at evaluation


@pytest.mark.parametrize("kind", ["mean_pooling", "max_pooling"])
@pytest.mark.parametrize("num_prompts", [4, 5])  # 16 tokens: remainder 1 (P=4), and 0 (P=5: the official -0: slice)
def test_pooled_prototype_candidates_match_the_official_generator(kind, num_prompts):
    x = torch.randn(3, 16, 8)
    ours = window_pool(x, num_prompts, kind)
    ref = official_window_pool(x, num_prompts, kind)
    assert ours.shape == ref.shape == (3 * num_prompts, 8)
    # the official stack is prompt-major, ours image-major; candidates are then sampled uniformly
    torch.testing.assert_close(ours, ref.reshape(num_prompts, 3, 8).transpose(0, 1).reshape(-1, 8))
