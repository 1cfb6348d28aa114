"""The LoRA baseline: q/v adapters on timm's fused qkv (default) or peft on named layers; only
adapters + head train; the backbone's base weights, and K, stay frozen."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from prompttune.config import ConfigError
from prompttune.methods.lora import LoRA, QVLoRA
from prompttune.module import PromptTuningModule
from test_vpt_spt import D, L, Task, TinyData, tiny_vit


@pytest.mark.parametrize("mode", ["qv", "peft"])
def test_adapters_and_head_are_the_only_trainable_parameters(mode):
    bb, data = tiny_vit(), TinyData()
    x = data.images[:4]
    with torch.no_grad():
        before = bb.encode_image(x)
    m = LoRA(r=2, alpha=4.0, mode=mode)
    m.setup(bb, data)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    parts = ("q_A", "q_B", "v_A", "v_B") if mode == "qv" else ("A", "B")
    assert names == {f"adapters.blocks__{i}__attn__qkv.{ab}.weight" for i in range(L) for ab in parts} | {
        "head.weight", "head.bias"}
    # qv: A_q, A_v [r, D] and B_q, B_v [D, r]; peft on the fused qkv: A [r, D], B [3D, r]. Both 4rD per block.
    assert sum(p.numel() for p in m.parameters()) == L * 4 * 2 * D + D * 4 + 4
    base = [p for n, p in bb.named_parameters() if id(p) not in {id(q) for q in m.adapters.parameters()}]
    assert base and not any(p.requires_grad for p in base)
    with torch.no_grad():  # B starts at zero: the adapted backbone equals the frozen one
        torch.testing.assert_close(bb.encode_image(x), before)
    module = PromptTuningModule(bb, m, Task())  # raises if anything but the method trains
    batch = next(iter(data.train_dataloader()))
    Task().loss(module(batch, "train"), batch).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert all(p.grad is None for p in base)
    assert all(k.startswith(("adapters.", "head.")) for k in m.state_dict())


def test_qv_mode_adapts_q_and_v_separately_and_leaves_k_unchanged():
    bb, data = tiny_vit(), TinyData()
    frozen = {i: blk.attn.qkv.weight.detach().clone() for i, blk in enumerate(bb.model.blocks)}
    m = LoRA(r=2, alpha=4.0)  # mode qv is the default
    m.setup(bb, data)
    wrapped = [blk.attn.qkv for blk in bb.model.blocks]
    assert all(isinstance(w, QVLoRA) for w in wrapped)
    torch.manual_seed(0)
    for ad in m.adapters.values():  # move B off zero so the updates act
        for key in ("q_B", "v_B"):
            ad[key].weight.data.normal_()
    w = wrapped[0]
    t = torch.randn(2, 5, D)
    with torch.no_grad():
        out, ref = w(t), torch.nn.functional.linear(t, frozen[0], w.base.bias)
        q, k, v = out.split(D, dim=-1)
        rq, rk, rv = ref.split(D, dim=-1)
        torch.testing.assert_close(k, rk, rtol=0, atol=0)  # K: exactly the frozen projection
        s = 4.0 / 2
        torch.testing.assert_close(q, rq + s * t @ w.q_A.weight.T @ w.q_B.weight.T)
        torch.testing.assert_close(v, rv + s * t @ w.v_A.weight.T @ w.v_B.weight.T)
        assert (q - rq).abs().max() > 1e-3 and (v - rv).abs().max() > 1e-3
    # separate updates: the q and v low-rank factors are distinct parameters
    assert w.q_A.weight.data_ptr() != w.v_A.weight.data_ptr()
    assert all(torch.equal(blk.attn.qkv.base.weight, frozen[i]) for i, blk in enumerate(bb.model.blocks))


def test_peft_mode_on_fused_qkv_shares_one_update_and_moves_k():
    bb, data = tiny_vit(), TinyData()
    m = LoRA(r=2, alpha=4.0, mode="peft")
    m.setup(bb, data)
    torch.manual_seed(0)
    for ad in m.adapters.values():
        ad["B"].weight.data.normal_()
    layer = bb.model.blocks[0].attn.qkv
    t = torch.randn(2, 5, D)
    with torch.no_grad():
        k_delta = (layer(t) - layer.base_layer(t))[..., D:2 * D]
    assert k_delta.abs().max() > 1e-3  # the old fused behaviour adapts K too


@pytest.mark.parametrize("mode", ["qv", "peft"])
def test_loss_falls(mode):
    bb, data = tiny_vit(), TinyData(n=32, batch_size=32)
    m = LoRA(r=4, alpha=8.0, mode=mode)
    m.setup(bb, data)
    opt = torch.optim.AdamW(m.parameters(), lr=0.02)
    batch = next(iter(data.train_dataloader()))
    losses = []
    for _ in range(15):
        loss = Task().loss(m(bb, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    b = m.adapters["blocks__0__attn__qkv"]["q_B" if mode == "qv" else "B"]
    assert b.weight.abs().sum() > 0  # the adapters moved


def test_bad_input_rejected():
    bb, data = tiny_vit(), TinyData()
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] match no linear layer.*qkv"):
        LoRA(mode="peft", target_modules=["q_proj"]).setup(bb, data)
    with pytest.raises(ConfigError, match="lora.r=0: must be >= 1"):
        LoRA(r=0)
    with pytest.raises(ConfigError, match="lora.mode='qk'"):
        LoRA(mode="qk")
    with pytest.raises(ConfigError, match="inert with mode=qv"):
        LoRA(target_modules=["qkv"])
    LoRA(r=2).setup(bb, data)
    with pytest.raises(RuntimeError, match="already carries LoRA adapters"):
        LoRA(r=2).setup(bb, data)


@pytest.mark.parametrize("bad,match", [
    ({"dropout": 0.1}, r"method.dropout=0.1: LoRA dropout would be inert"),
    ({"target_modules": ["qkv"]}, r"method.target_modules=\['qkv'\] is inert with method.mode=qv"),
    ({"mode": "fused"}, r"method.mode='fused': expected one of qv, peft"),
    ({"r": 0}, r"method.r=0: expected a whole number >= 1"),
])
def test_check_config_rejects_before_compute(bad, match):
    cfg = OmegaConf.create({"method": {"name": "lora", "mode": "qv", "r": 8, "alpha": 8.0, "dropout": 0.0,
                                       "target_modules": None, **bad}})
    with pytest.raises(ConfigError, match=match):
        LoRA.check_config(cfg)
    LoRA.check_config(OmegaConf.create({"method": {"mode": "peft", "target_modules": ["qkv", "fc1"], "r": 4}}))
