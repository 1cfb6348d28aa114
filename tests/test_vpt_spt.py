"""VPT and SPT on a tiny random timm ViT: trainable set, insertion, prototypes from layer-i tokens."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from prompttune.backbones.vit import ViTBackbone
from prompttune.methods._vit_prompts import PrototypeSampler, RandomSubset, kmeans, window_pool
from prompttune.methods.spt import SPT
from prompttune.methods.vpt import VPT
from prompttune.module import PromptTuningModule

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
D, L, N = 32, 3, 16


def tiny_vit(pool="avg") -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(model="vit_tiny_patch16_224", model_kwargs=TINY, weights="random", pool=pool)


class TinyData:
    """Just what methods read from a data module: info(), seed, train_dataloader()."""

    def __init__(self, n=48, classes=4, batch_size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        # class-dependent colour shift: learnable through the frozen random ViT
        self.images = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + self.labels.view(-1, 1, 1, 1).float() - 1.5
        self.classes, self.batch_size, self.seed, self.datasets = classes, batch_size, seed, {"train": True}

    def info(self):
        return {"num_classes": self.classes, "classnames": [str(i) for i in range(self.classes)]}

    def train_dataloader(self):
        items = [{"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}
                 for i in range(len(self.labels))]
        return DataLoader(items, batch_size=self.batch_size, shuffle=False)


class Task(nn.Module):
    def loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs["logits"], batch["label"])


def trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cls,kw", [(VPT, {}), (SPT, {"init_type": "random"}), (SPT, {"init_type": "kmeans"})])
@pytest.mark.parametrize("deep", [False, True])
def test_only_prompts_and_head_train_and_get_grads(cls, kw, deep):
    bb, data = tiny_vit(), TinyData()
    m = cls(num_prompts=5, deep=deep, **kw)
    m.setup(bb, data)
    assert m.prompts.shape == ((L if deep else 1), 5, D)
    assert trainable(m) == {"prompts", "head.weight", "head.bias"}
    module = PromptTuningModule(bb, m, Task())  # asserts that nothing else requires grad
    assert module.trainable_params == (L if deep else 1) * 5 * D + D * 4 + 4
    batch = next(iter(data.train_dataloader()))
    loss = Task().loss(module(batch, "train"), batch)
    loss.backward()
    assert m.prompts.grad is not None and m.prompts.grad.abs().sum(dim=(1, 2)).gt(0).all()  # every layer's set
    assert m.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())
    assert set(m.state_dict()) == {"prompts", "head.weight", "head.bias"}


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_are_inserted_after_cls_and_replaced_per_block(deep):
    bb, data = tiny_vit(), TinyData()
    m = VPT(num_prompts=4, deep=deep)
    m.setup(bb, data)
    inputs = {}
    for i, blk in enumerate(bb.blocks):
        blk.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
    images = data.images[:2]
    with torch.no_grad():
        m(bb, {"image": images})
        embedded = bb.embed_tokens(images)
    for i in range(L):
        x = inputs[i]
        assert x.shape == (2, 1 + 4 + N, D)
    torch.testing.assert_close(inputs[0][:, 0], embedded[:, 0])       # CLS first
    torch.testing.assert_close(inputs[0][:, 5:], embedded[:, 1:])     # patches after the prompts
    torch.testing.assert_close(inputs[0][:, 1:5], m.prompts[0].expand(2, -1, -1).detach())
    if deep:
        for i in range(1, L):  # block i sees prompts[i], not the previous block's prompt outputs
            torch.testing.assert_close(inputs[i][:, 1:5], m.prompts[i].expand(2, -1, -1).detach())
    else:
        assert not torch.allclose(inputs[1][:, 1:5], m.prompts[0].expand(2, -1, -1).detach())


def test_vpt_random_init_range():
    bb = tiny_vit()
    m = VPT(num_prompts=50, deep=True)
    m.setup(bb, TinyData())
    v = math.sqrt(6 / (3 * 4 * 4 + D))
    assert m.prompts.abs().max() <= v
    assert m.prompts.std().item() == pytest.approx(v / math.sqrt(3), rel=0.1)  # U(-v, v)


class AddConst(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, *a, **k):
        return x + self.c


def known_vit():
    """A ViT whose block i adds 100·(i+1): the tokens of layer i are patch+pos embeddings + 100·i
    (patch tokens only at layer 0), so every prototype tells which layer it came from."""
    bb = tiny_vit()
    for i in range(L):
        bb.model.blocks[i] = AddConst(100.0 * (i + 1))
    return bb


@pytest.mark.parametrize("init_type", ["random", "mean_pooling", "max_pooling", "kmeans"])
def test_spt_prototypes_come_from_layer_i_tokens(init_type):
    bb, data = known_vit(), TinyData(n=8, batch_size=3)
    m = SPT(num_prompts=5, deep=True, init_type=init_type, kmeans_samples=64)
    m.setup(bb, data)
    with torch.no_grad():
        toks = bb.layer_tokens(data.images, range(L))  # {i: [8, 16, D]}, computed in one go here
    for i in range(L):
        cand = toks[i].reshape(-1, D)
        if init_type in ("mean_pooling", "max_pooling"):
            cand = window_pool(toks[i], 5, init_type)
        p = m.prompts[i].detach()
        if init_type == "kmeans":  # centres are averages of layer-i tokens: they sit at layer i's offset
            assert (p.mean() - cand.mean()).abs() < 5 and (p.mean() - toks[(i + 1) % L].mean()).abs() > 50
        else:  # each prompt row is exactly one candidate of *this* layer
            dist = (p[:, None] - cand[None]).abs().amax(-1).min(dim=1).values  # exact, unlike cdist
            assert dist.max() < 1e-5, (init_type, i, dist)
            assert len({tuple(r.tolist()) for r in p}) == 5  # sampled without replacement
    assert m.init_stats["images"] == 8


def test_spt_layer0_is_patch_embedding_without_position():
    bb, data = tiny_vit(), TinyData(n=4)
    m = SPT(num_prompts=6, deep=False, init_type="random")
    m.setup(bb, data)
    with torch.no_grad():
        patches = bb.patch_tokens(data.images).reshape(-1, D)
    assert (m.prompts[0].detach()[:, None] - patches[None]).abs().amax(-1).min(1).values.max() < 1e-6


def test_window_pool_by_hand():
    t = torch.arange(10.0).view(1, 10, 1)  # N=10 tokens, P=4 -> w=3, windows [0:3],[3:6],[6:9], last N%w=1 token
    torch.testing.assert_close(window_pool(t, 4, "mean_pooling").flatten(), torch.tensor([1.0, 4.0, 7.0, 9.0]))
    torch.testing.assert_close(window_pool(t, 4, "max_pooling").flatten(), torch.tensor([2.0, 5.0, 8.0, 9.0]))
    t9 = torch.arange(9.0).view(1, 9, 1)  # N % w == 0: the last window is the whole sequence (official slice)
    torch.testing.assert_close(window_pool(t9, 4, "mean_pooling").flatten(), torch.tensor([1.0, 4.0, 7.0, 4.0]))
    with pytest.raises(ValueError, match="num_prompts - 1 <= tokens per image"):
        window_pool(t, 20, "mean_pooling")


def test_random_subset_is_uniform_and_bounded():
    counts = torch.zeros(10)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        s = RandomSubset(3, g)
        for chunk in torch.arange(10.0).view(5, 2, 1):  # streamed in chunks of 2
            s.add(chunk)
            assert s.rows.shape[0] <= 3
        counts[s.result().long().flatten()] += 1
    assert counts.sum() == 6000 and (counts / 600 - 1).abs().max() < 0.12  # each kept w.p. 3/10


def test_sampler_reads_at_most_init_images():
    bb, data = tiny_vit(), TinyData(n=48, batch_size=16)
    s = PrototypeSampler("random", 4, [0, 1], max_images=20)
    s.run(bb, iter(data.train_dataloader()))
    assert s.images == 20


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    got = kmeans(x, 3, 20, g)
    assert torch.cdist(centres, got).min(dim=1).values.max() < 0.2


def test_loss_falls_with_spt():
    bb, data = tiny_vit(), TinyData(n=32, batch_size=32)
    m = SPT(num_prompts=4, deep=True, init_type="mean_pooling")
    m.setup(bb, data)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    batch = next(iter(data.train_dataloader()))
    losses = []
    for _ in range(15):
        loss = Task().loss(m(bb, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_param_groups_split_head_decay():
    bb = tiny_vit()
    m = SPT(num_prompts=3, head_weight_decay=1.0)
    m.setup(bb, TinyData())
    groups = m.param_groups({"weight_decay": 0.05})
    assert [g["weight_decay"] for g in groups] == [0.05, 1.0, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="init_type must be one of random, mean_pooling, max_pooling, kmeans"):
        SPT(init_type="pca")
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        VPT(num_prompts=0)
    with pytest.raises(TypeError, match="unknown vpt option"):
        VPT(init_type="random")
    with pytest.raises(TypeError, match="needs the 'vit' backbone"):
        VPT().setup(nn.Linear(2, 2), TinyData())
    with pytest.raises(ValueError, match="num_classes"):
        VPT().setup(tiny_vit(), type("D", (), {"info": lambda self: {}})())
