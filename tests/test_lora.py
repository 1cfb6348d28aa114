"""The peft LoRA baseline: only adapters + head train; the backbone's base weights stay frozen."""

from __future__ import annotations

import pytest
import torch

from prompttune.methods.lora import LoRA
from prompttune.module import PromptTuningModule
from test_vpt_spt import D, L, Task, TinyData, tiny_vit


def test_adapters_and_head_are_the_only_trainable_parameters():
    bb, data = tiny_vit(), TinyData()
    x = data.images[:4]
    with torch.no_grad():
        before = bb.encode_image(x)
    m = LoRA(r=2, alpha=4.0)
    m.setup(bb, data)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {f"adapters.blocks__{i}__attn__qkv.{ab}.weight" for i in range(L) for ab in "AB"} | {
        "head.weight", "head.bias"}
    # A: [r, D], B: [3D, r] per block (LoRA on the fused qkv), plus the head
    assert sum(p.numel() for p in m.parameters()) == L * (2 * D + 3 * D * 2) + D * 4 + 4
    base = [p for n, p in bb.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    with torch.no_grad():  # B starts at zero: the adapted backbone equals the frozen one
        torch.testing.assert_close(bb.encode_image(x), before)
    module = PromptTuningModule(bb, m, Task())  # raises if anything but the method trains
    batch = next(iter(data.train_dataloader()))
    Task().loss(module(batch, "train"), batch).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert all(p.grad is None for p in base)
    assert all(k.startswith(("adapters.", "head.")) for k in m.state_dict())


def test_loss_falls():
    bb, data = tiny_vit(), TinyData(n=32, batch_size=32)
    m = LoRA(r=4, alpha=8.0)
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
    assert m.adapters["blocks__0__attn__qkv"]["B"].weight.abs().sum() > 0  # the adapters moved


def test_bad_input_rejected():
    bb, data = tiny_vit(), TinyData()
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] match no linear layer.*qkv"):
        LoRA(target_modules=["q_proj"]).setup(bb, data)
    with pytest.raises(ValueError, match="r must be >= 1"):
        LoRA(r=0)
    LoRA(r=2).setup(bb, data)
    with pytest.raises(RuntimeError, match="already carries LoRA adapters"):
        LoRA(r=2).setup(bb, data)
