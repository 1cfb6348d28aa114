"""MAE-VQGAN backbone: architecture, frozen contract, official-format checkpoint loading."""

from __future__ import annotations

import argparse

import pytest
import torch

from prompttune.backbones.mae_vqgan import (MAEVQGANBackbone, make_model, sincos_pos_embed)

TINY_OVERRIDES = {"mae": {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                          "decoder_num_heads": 2}}


def test_large_preset_matches_official_shapes():
    """The ``large`` preset has the official parameter names and shapes (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = make_model("large")
    sd = m.state_dict()
    assert sd["mae.patch_embed.proj.weight"].shape == (1024, 3, 16, 16)
    assert sd["mae.pos_embed"].shape == (1, 197, 1024)
    assert sd["mae.blocks.23.attn.qkv.weight"].shape == (3072, 1024)
    assert sd["mae.decoder_blocks.7.mlp.fc1.weight"].shape == (2048, 512)
    assert sd["mae.decoder_pred.weight"].shape == (1024, 512)
    assert sd["vqgan.quantize.embedding.weight"].shape == (1024, 256)
    assert sd["vqgan.encoder.down.4.attn.1.q.weight"].shape == (512, 512, 1, 1)  # attention at 16 px
    assert sd["vqgan.decoder.up.4.attn.2.proj_out.weight"].shape == (512, 512, 1, 1)
    assert "vqgan.encoder.down.0.downsample.conv.weight" in sd and "vqgan.decoder.up.1.upsample.conv.weight" in sd
    assert sum(v.numel() for k, v in sd.items() if k.startswith("mae.")) > 300_000_000


def test_sincos_matches_mae_layout():
    e = sincos_pos_embed(8, 3)
    assert e.shape == (10, 8) and torch.all(e[0] == 0)
    # token 1 = (row 0, col 1): the first half encodes the column (w), the second the row (h)
    assert torch.allclose(e[2, :4], torch.tensor([torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01)),
                                                  torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01))]))
    assert torch.allclose(e[2, 4:], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_tokenize_predict_decode_shapes_and_frozen():
    bb = MAEVQGANBackbone(arch="tiny", weights="random", overrides=TINY_OVERRIDES)
    assert all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training
    g = bb.geometry
    assert (g.size, g.patch, g.cell, g.grid) == (64, 8, 31, 8)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    tok = bb.tokenize(x)
    assert tok.shape == (2, 64) and tok.dtype == torch.long and int(tok.max()) < bb.vocab_size
    logits = bb.predict_logits(x, g.token_mask("a1"))
    assert logits.shape == (2, 64, 128)
    logits[:, g.token_mask("a1")].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the canvas ...
    assert all(p.grad is None for p in bb.parameters())  # ... never the weights
    img = bb.decode_tokens(tok)
    assert img.shape == (2, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
    with pytest.raises(ValueError, match=r"canvas must be \[B, 3, 64, 64\]"):
        bb.tokenize(torch.rand(1, 3, 32, 32))


def test_visible_tokens_only_reach_the_encoder():
    """Changing masked pixels must not change the logits (the masked quadrant is dropped)."""
    bb = MAEVQGANBackbone(arch="tiny", weights="random", overrides=TINY_OVERRIDES)
    m = bb.geometry.token_mask("a1")
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[..., 32:, 32:] = torch.rand(1, 3, 32, 32)
    assert torch.allclose(bb.predict_logits(x, m), bb.predict_logits(y, m), atol=1e-5)
    y[..., :8, :8] = 0  # a visible patch does matter
    assert not torch.allclose(bb.predict_logits(x, m), bb.predict_logits(y, m), atol=1e-5)


def test_loads_official_checkpoint_formats(tmp_path):
    """MAE as {'model': ..., 'args': Namespace} and VQGAN as a Lightning {'state_dict'} with loss.* keys."""
    src = make_model("tiny", **TINY_OVERRIDES)
    torch.nn.init.normal_(src.mae.decoder_pred.weight)
    mae_sd = {k[len("mae."):]: v for k, v in src.state_dict().items() if k.startswith("mae.")}
    vq_sd = {k[len("vqgan."):]: v for k, v in src.state_dict().items() if k.startswith("vqgan.")}
    vq_sd["loss.discriminator.main.0.weight"] = torch.zeros(1)
    torch.save({"model": mae_sd, "epoch": 999, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "checkpoint-1000.pth")
    torch.save({"state_dict": vq_sd, "global_step": 1}, tmp_path / "last.ckpt")
    bb = MAEVQGANBackbone(arch="tiny", overrides=TINY_OVERRIDES, mae_checkpoint=str(tmp_path / "checkpoint-1000.pth"),
                          vqgan_checkpoint=str(tmp_path / "last.ckpt"))
    for k, v in src.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v), k
    # a VQGAN shipped inside the MAE checkpoint as vae.* is used when no separate file is given
    torch.save({"model": {**mae_sd, **{f"vae.{k}": v for k, v in vq_sd.items()}}}, tmp_path / "both.pth")
    bb2 = MAEVQGANBackbone(arch="tiny", overrides=TINY_OVERRIDES, mae_checkpoint=str(tmp_path / "both.pth"))
    assert torch.equal(bb2.model.vqgan.quantize.embedding.weight, src.vqgan.quantize.embedding.weight)


def test_bad_checkpoints_rejected(tmp_path):
    with pytest.raises(ValueError, match="needs mae_checkpoint"):
        MAEVQGANBackbone(arch="tiny")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        MAEVQGANBackbone(arch="tiny", mae_checkpoint=str(tmp_path / "nope.pth"))
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not match the MAE architecture"):
        MAEVQGANBackbone(arch="tiny", mae_checkpoint=str(tmp_path / "wrong.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only checkpoint"):
        MAEVQGANBackbone(arch="tiny", mae_checkpoint=str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="unknown MAE-VQGAN preset 'huge'"):
        make_model("huge")
    with pytest.raises(ValueError, match="VQGAN downsamples by 16 but the MAE patch is 8"):
        make_model("tiny", vq={"ch_mult": (1, 1, 2, 2, 4)})
