"""The timm ViT wrapper: checkpoint formats (MAE, MoCo-v3, timm), pooling, hooks, freezing."""

from __future__ import annotations

import pytest
import torch

from prompttune.backbones.vit import ViTBackbone

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny(**kw) -> ViTBackbone:
    kw.setdefault("weights", "random")
    return ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, **kw)


def timm_vit(global_pool: str):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    m = VisionTransformer(num_classes=0, global_pool=global_pool, **TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def test_mae_checkpoint_maps_norm_to_fc_norm_and_pools_patch_mean(tmp_path):
    src = timm_vit("token")  # MAE's encoder: final `norm`, no fc_norm
    enc = src.state_dict()
    ckpt = {"model": {**enc, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(16, 32),
                      "decoder_pred.weight": torch.zeros(48, 16)}}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save(ckpt, path)
    bb = ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, checkpoint=str(path))
    assert bb.name.endswith("(mae)") and bb.pool == "avg"
    assert torch.equal(bb.model.fc_norm.weight, enc["norm.weight"])
    assert torch.equal(bb.model.blocks[1].mlp.fc2.weight, enc["blocks.1.mlp.fc2.weight"])
    x = torch.randn(3, 3, 16, 16)
    # by hand: blocks over [cls + patches + pos], mean of the patch tokens, then the MAE norm
    with torch.no_grad():
        t = src.patch_embed(x)
        t = torch.cat([src.cls_token.expand(3, -1, -1), t], 1) + src.pos_embed
        t = src.blocks(t)[:, 1:].mean(1)
        want = torch.nn.functional.layer_norm(t, (32,), enc["norm.weight"], enc["norm.bias"], eps=1e-6)
        got = bb.encode_image(x)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_moco_checkpoint_takes_base_encoder_and_pools_cls(tmp_path):
    src = timm_vit("token")
    enc = src.state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in enc.items()})
    sd["module.base_encoder.head.0.weight"] = torch.zeros(64, 32)  # MoCo's projection MLP: dropped
    sd["module.predictor.0.weight"] = torch.zeros(64, 64)
    path = tmp_path / "vit-tiny-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_tiny", "state_dict": sd}, path)
    bb = ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, checkpoint=str(path))
    assert bb.name.endswith("(moco)") and bb.pool == "cls"
    assert torch.equal(bb.model.pos_embed, enc["pos_embed"])  # base encoder, not the momentum one
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = src.forward_head(src.forward_features(x), pre_logits=True)
        torch.testing.assert_close(bb.encode_image(x), want, rtol=1e-4, atol=1e-5)


def test_timm_state_dict_with_module_prefix_and_head(tmp_path):
    src = timm_vit("token")
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.head.weight"] = torch.zeros(10, 32)
    path = tmp_path / "sup.pth"
    torch.save(sd, path)
    bb = ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, checkpoint=str(path))
    assert bb.name.endswith("(timm)")
    assert torch.equal(bb.model.cls_token, src.cls_token.detach())


def test_bad_checkpoints_are_rejected_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT checkpoint not found"):
        tiny(checkpoint=str(tmp_path / "nope.pth"), weights="pretrained")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        tiny(checkpoint=str(bad), weights="pretrained")
    src = timm_vit("token").state_dict()
    src.pop("blocks.1.attn.qkv.weight")
    short = tmp_path / "short.pth"
    torch.save({"model": src}, short)
    with pytest.raises(ValueError, match=r"missing \['blocks.1.attn.qkv.weight'\]"):
        tiny(checkpoint=str(short), weights="pretrained")
    moco = tmp_path / "moco.pth"
    torch.save({"state_dict": {"module.x.y": torch.zeros(1)}}, moco)
    with pytest.raises(ValueError, match="module.base_encoder"):
        tiny(checkpoint=str(moco), weights="pretrained", checkpoint_format="moco")


def test_bad_options_are_rejected():
    from prompttune.config import ConfigError

    with pytest.raises(ConfigError, match=r"backbone.pool='gap': expected one of auto, cls, avg"):
        tiny(pool="gap")
    with pytest.raises(ValueError, match="checkpoint_format"):
        tiny(checkpoint_format="jax")
    with pytest.raises(ValueError, match="has no source of weights"):
        ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, weights="pretrained")
    with pytest.raises(ConfigError, match="backbone.model='vit_nope': not a timm model"):
        ViTBackbone(model="vit_nope", weights="random")


def test_frozen_and_stays_in_eval():
    bb = tiny()
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.model.blocks[0].training
    assert bb.embed_dim == 32 and bb.depth == 2 and bb.patch_size == 4 and bb.num_patches == 16
    assert bb.image_size == 16 and bb.num_prefix_tokens == 1


def test_layer_tokens_are_block_inputs():
    bb = tiny()
    seen = {}
    bb.model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__(0, o))
    for i, blk in enumerate(bb.model.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i + 1, out[:, 1:]))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        bb.encode_image(x)
        toks = bb.layer_tokens(x, [0, 1, 2])
    for i in (0, 1, 2):
        assert toks[i].shape == (2, 16, 32)
        torch.testing.assert_close(toks[i], seen[i])
    with pytest.raises(ValueError, match="layer indices must lie in 0..2"):
        bb.layer_tokens(x, [3])


def test_pool_override_and_cls():
    bb = tiny(pool="cls")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = bb.model.blocks(bb.embed_tokens(x))
        torch.testing.assert_close(bb.encode_image(x), bb.model.norm(t)[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vpt", "vpt_deep", "spt", "spt_deep", "lora"])
def test_smoke_fit(cli, tmp_path, method):
    """`prompttune fit experiments/smoke.yaml method=...` over the (untrained) zoo ViT."""
    import json

    out = cli("fit", "experiments/smoke.yaml", f"method={method}", f"run_dir={tmp_path / method}")
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / method / "result.json").read_text())
    assert res["status"] == "completed" and 0.0 <= res["metrics"]["test/acc"] <= 1.0
    assert res["trainable_params"] > 0
