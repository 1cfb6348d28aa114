"""Scratch MoCo-v3 recipe for the zoo ViT (docs/zoo.md, vit-mae-tiny): SPT's second self-supervised
backbone (PAPERS.md, SPT), tried because MAE gives this tiny ViT no usable features. Pretrains the
zoo's tiny ViT (CLS pooling) with MoCo v3 as its official recipe does, scaled down, and prints the
zoo's ridge probe every `probe_every` steps:

* a fixed 2-D sin-cos position embedding and a frozen random patch projection (MoCo v3's
  ``stop_grad_conv1``); a 3-layer projector and a 2-layer predictor of Linear + BN (+ ReLU), the
  last BN without affine (``_build_mlp`` of ``moco/builder.py``); a momentum encoder whose momentum
  rises from ``m`` to 1 on a half-cosine; the symmetric loss ``ctr(q1, k2) + ctr(q2, k1)``, each
  ``2 tau CE(q k^T / tau)``;
* BYOL's two asymmetric views: random resized crop, flip, colour jitter (p 0.8), grayscale (p 0.2),
  Gaussian blur (p 1.0 / 0.1, sigma scaled from 224 to 32 px), solarisation (p 0 / 0.2);
* AdamW, warm-up then cosine; width 96, depth 4, patch 4 at 32 px, a 256-wide MLP, 64-d output.

    OMP_NUM_THREADS=1 python scripts/zoo_moco_probe.py '{"steps": 300, "batch": 128}'
"""



import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones.vit import set_pooling
from prompttune.zoo._probe import linear_probe
from prompttune.zoo.vit_mae_tiny import ZOO_MEAN, ZOO_STD, make_tiny_vit, sincos_pos_embed, world_images


def _mlp(n_layers: int, d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear (no bias) + BN + ReLU, the last BN without affine."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        a = d_in if i == 0 else d_hidden
        b = d_out if i == n_layers - 1 else d_hidden
        layers.append(nn.Linear(a, b, bias=False))
        if i < n_layers - 1:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        else:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- BYOL's augmentations, batched
def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _u(b: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, generator=g)


def augment(x: torch.Tensor, g: torch.Generator, blur_p: float, solar_p: float, scale_min: float = 0.2,
            blur_sigma: tuple[float, float] = (0.1, 2.0 * 32 / 224)) -> torch.Tensor:
    """One BYOL view of images in [0, 1], [B, 3, H, W] -> [B, 3, H, W] in [0, 1]."""
    b, _, h, w = x.shape
    # random resized crop (area in [scale_min, 1], aspect in [3/4, 4/3]) and horizontal flip
    area, logr = _u(b, scale_min, 1.0, g), _u(b, math.log(3 / 4), math.log(4 / 3), g)
    cw, ch = (area * logr.exp()).sqrt().clamp(max=1.0), (area / logr.exp()).sqrt().clamp(max=1.0)
    cx, cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - cw), (torch.rand(b, generator=g) * 2 - 1) * (1 - ch)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw * flip, cx, ch, cy
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                      padding_mode="reflection", align_corners=False)
    # colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8
    on = (torch.rand(b, generator=g) < 0.8).view(b, 1, 1, 1)
    j = x * _u(b, 0.6, 1.4, g).view(b, 1, 1, 1)
    j = j.clamp(0, 1)
    m = _gray(j).mean((1, 2, 3), keepdim=True)
    j = ((j - m) * _u(b, 0.6, 1.4, g).view(b, 1, 1, 1) + m).clamp(0, 1)
    gr = _gray(j)
    j = ((j - gr) * _u(b, 0.8, 1.2, g).view(b, 1, 1, 1) + gr).clamp(0, 1)
    # hue: a rotation of the chroma plane of YIQ
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    ang = _u(b, -0.1, 0.1, g) * 2 * math.pi
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, ang.cos(), -ang.sin(), ang.sin(), ang.cos()
    mat = torch.linalg.inv(yiq) @ rot @ yiq  # [B, 3, 3]
    j = torch.einsum("bij,bjhw->bihw", mat, j).clamp(0, 1)
    x = torch.where(on, j, x)
    # grayscale with p 0.2
    x = torch.where((torch.rand(b, generator=g) < 0.2).view(b, 1, 1, 1), _gray(x).expand(-1, 3, -1, -1), x)
    # Gaussian blur with p blur_p (separable, per-image sigma)
    sig = _u(b, *blur_sigma, g)
    r = 2
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sig[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [B*3, 2r+1]
    y = x.reshape(1, b * 3, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * 3)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=b * 3).reshape(b, 3, h, w)
    x = torch.where((torch.rand(b, generator=g) < blur_p).view(b, 1, 1, 1), y, x)
    # solarisation with p solar_p
    x = torch.where((torch.rand(b, generator=g) < solar_p).view(b, 1, 1, 1), torch.where(x < 0.5, x, 1 - x), x)
    return x


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3's ``contrastive_loss``: 2 tau CE over the batch (positives on the diagonal)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / tau
    return F.cross_entropy(logits, torch.arange(len(q))) * (2 * tau)


def moco_pretrain(model: nn.Module, images: torch.Tensor, steps: int = 300, batch: int = 128, lr: float = 1e-3,
                  wd: float = 0.1, tau: float = 0.2, m: float = 0.99, warm: float = 0.1, dim: int = 64,
                  hidden: int = 256, scale_min: float = 0.2, seed: int = 0,
                  callback: Callable[[int, float], None] | None = None, every: int = 0,
                  progress: bool = False) -> dict[str, Any]:
    """MoCo-v3 pretraining of ``model`` (a timm ViT with CLS pooling) in place on ``images``
    (normalised with the zoo's statistics). Returns the first and last loss."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(model.embed_dim, model.patch_embed.grid_size[0]))
    model.pos_embed.requires_grad_(False)
    for p in model.patch_embed.parameters():  # stop_grad_conv1
        p.requires_grad_(False)
    base = nn.ModuleDict({"enc": model, "proj": _mlp(3, model.embed_dim, hidden, dim)})
    predictor = _mlp(2, dim, hidden, dim)
    momentum = copy.deepcopy(base)
    for p in momentum.parameters():
        p.requires_grad_(False)
    params = [p for p in list(base.parameters()) + list(predictor.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warm,
                                                anneal_strategy="cos")
    g = torch.Generator().manual_seed(seed)
    raw = images * torch.tensor(ZOO_STD).view(1, 3, 1, 1) + torch.tensor(ZOO_MEAN).view(1, 3, 1, 1)
    norm = lambda v: (v - torch.tensor(ZOO_MEAN).view(1, 3, 1, 1)) / torch.tensor(ZOO_STD).view(1, 3, 1, 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="zoo vit-moco-tiny: MoCo-v3 pretraining", unit="step")
    base.train(), predictor.train(), momentum.train()
    first = last = float("nan")
    step = 0
    while step < steps:
        perm = torch.randperm(len(raw), generator=g)
        for i in range(0, len(raw) - batch + 1, batch):
            x = raw[perm[i:i + batch]]
            x1, x2 = norm(augment(x, g, 1.0, 0.0, scale_min)), norm(augment(x, g, 0.1, 0.2, scale_min))
            mom = 1 - 0.5 * (1 + math.cos(math.pi * step / steps)) * (1 - m)
            q1 = predictor(base["proj"](model(x1)))
            q2 = predictor(base["proj"](model(x2)))
            with torch.no_grad():
                for pb, pm in zip(base.parameters(), momentum.parameters()):
                    pm.mul_(mom).add_(pb.detach(), alpha=1 - mom)
                k1 = momentum["proj"](momentum["enc"](x1))
                k2 = momentum["proj"](momentum["enc"](x2))
            loss = contrastive_loss(q1, k2, tau) + contrastive_loss(q2, k1, tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            last = float(loss.detach())
            first = last if first != first else first
            if bar is not None:
                bar.set_postfix(loss=f"{last:.3f}")
                bar.update()
            if callback is not None and every and (step % every == 0 or step == steps):
                callback(step, last)
            if step >= steps:
                break
    if bar is not None:
        bar.close()
    model.pos_embed.requires_grad_(True)
    for p in model.patch_embed.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"images": len(images), "steps": steps, "batch": batch, "first_loss": round(first, 4),
            "final_loss": round(last, 4)}


# ---------------------------------------------------------------- the probe run
torch.set_num_threads(1)
cfg = dict(steps=300, batch=128, lr=1e-3, wd=0.1, tau=0.2, m=0.99, probe_every=50, n_per_class=128, seed=0,
           warm=0.1, dim=64, hidden=256, scale_min=0.2, bg="noise", save="/tmp/moco_last.pt")
cfg.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
print(cfg, flush=True)

torch.manual_seed(cfg["seed"])  # the ViT's initialisation too: the probe figures reproduce
model = make_tiny_vit()
set_pooling(model, "cls")  # the zoo ViT, pooled with CLS as MoCo v3's ViTs are
t0 = time.time()


def probe(step, loss):
    model.eval()
    p = linear_probe(model, 32, ZOO_MEAN, ZOO_STD)
    model.train()
    print(f"step {step} loss {loss:.4f} probe {p['linear_probe_acc']:.4f} t {time.time() - t0:.0f}s", flush=True)


kw = {k: cfg[k] for k in ("steps", "batch", "lr", "wd", "tau", "m", "seed", "warm", "dim", "hidden",
                          "scale_min")}
out = moco_pretrain(model, images=world_images(cfg["n_per_class"], cfg["seed"], cfg["bg"]), callback=probe,
                      every=cfg["probe_every"], **kw)
print(out, flush=True)
torch.save({"model": model.state_dict(), "cfg": cfg}, cfg["save"])
