"""Zoo entry ``vit-mae-tiny``: a small timm ViT, MAE-pretrained on synthetic-world images.

SPT's claim is about MAE-pretrained ViTs, so this model is pretrained as MAE is (He et al.,
2022): fixed sin-cos positions, 75% masking, normalised-pixel targets, a light decoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prompttune import zoo
from prompttune.backbones.vit import _timm

ZOO_MEAN = (0.5, 0.5, 0.5)
ZOO_STD = (0.5, 0.5, 0.5)
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
                num_classes=0, global_pool="avg", qkv_bias=True)


def make_tiny_vit() -> nn.Module:
    _timm()  # the torchvision shim first
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**TINY_VIT)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, [1, (1 +) grid*grid, dim]."""
    assert dim % 4 == 0
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    pe = torch.cat([emb(xs), emb(ys)], dim=1).float()
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], dim=0)
    return pe.unsqueeze(0)


class MAEDecoder(nn.Module):
    """A small MAE decoder (He et al., 2022, Sec. 3): mask tokens + sin-cos positions, a few blocks, pixel head."""

    def __init__(self, enc_dim: int, num_patches: int, patch_px: int, dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        grid = int(math.isqrt(num_patches))
        self.register_buffer("pos", sincos_pos_embed(dim, grid), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_px)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        b, n = ids_restore.shape
        masks = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        body = torch.cat([x[:, 1:], masks], dim=1)
        body = torch.gather(body, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], body], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


def mae_loss(model: nn.Module, decoder: MAEDecoder, images: torch.Tensor, mask_ratio: float,
             generator: torch.Generator | None = None, norm_pix: bool = True) -> torch.Tensor:
    """One MAE step (Eq. of Sec. 3): encode a random 25% of the patches, reconstruct the
    per-patch normalised pixels of the masked ones (``norm_pix=False``: the raw pixels), MSE on
    masked patches only."""
    p = model.patch_embed.patch_size[0]
    b = images.shape[0]
    x = model.patch_embed(images)
    x = x.flatten(1, 2) if x.ndim == 4 else x
    x = x + model.pos_embed[:, 1:]
    n = x.shape[1]
    keep = int(n * (1 - mask_ratio))
    noise = torch.rand(b, n, generator=generator, device=images.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[2]))
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(b, -1, -1)
    x = model.blocks(torch.cat([cls, x], dim=1))
    x = model.fc_norm(x)  # MAE's encoder-final norm; after pretraining it is the fc_norm of avg pooling
    pred = decoder(x, ids_restore)
    target = images.unfold(2, p, p).unfold(3, p, p)  # B, C, h, w, p, p
    target = target.permute(0, 2, 3, 4, 5, 1).reshape(b, n, -1)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    if norm_pix:
        target = (target - mean) / (var + 1e-6) ** 0.5
    mask = torch.ones(b, n, device=images.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def world_images(n_per_class: int = 128, seed: int = 0, background: str = "noise") -> torch.Tensor:
    """The zoo ViTs' unlabelled pretraining images: ``n_per_class`` world images of each of the 16
    classes (on the noise background by default), normalised with the zoo's statistics, [N, 3, 32, 32]."""
    from prompttune.config import cache_dir
    from prompttune.data.base import ImageTransform, read_image
    from prompttune.data.image_folder import ensure_synthetic, read_split_file

    root = cache_dir() / "data" / (f"world-mae-{n_per_class}-s{seed}" + ("" if background == "noise" else f"-{background}"))
    ensure_synthetic({"kind": "classification", "n_train": n_per_class, "n_val": 0, "n_test": 0, "side": 32,
                      "seed": 1000 + seed, "background": background}, root)
    rows = read_split_file(root / "split_prompttune_world.json")["train"]
    tf = ImageTransform(32, ZOO_MEAN, ZOO_STD)
    return torch.stack([tf(read_image(root / "images" / r[0])) for r in rows])


def pretrain_mae(model: nn.Module, folder: Path, n_per_class: int = 128, epochs: int = 15, batch_size: int = 256,
                 lr: float = 2e-3, mask_ratio: float = 0.75, seed: int = 0) -> dict[str, Any]:
    """MAE pretraining of the zoo ViT on synthetic-world images (no labels are used).

    As MAE: fixed sin-cos position embeddings, 75% masking, normalised-pixel targets,
    AdamW (betas 0.9/0.95, wd 0.05), warm-up + cosine. Small: a 1-block 64-d decoder, 15 epochs over 2,048 images.
    """
    from tqdm.auto import tqdm

    images = world_images(n_per_class, seed)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(model.embed_dim, model.patch_embed.grid_size[0]))
    model.pos_embed.requires_grad_(False)
    decoder = MAEDecoder(model.embed_dim, model.patch_embed.num_patches, 3 * model.patch_embed.patch_size[0] ** 2, depth=1)
    params = [p for p in list(model.parameters()) + list(decoder.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    decoder.train()
    bar = tqdm(total=steps, desc="zoo vit-mae-tiny: MAE pretraining", unit="step")
    first = last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            batch = images[perm[i:i + batch_size]]
            if torch.rand(1, generator=g).item() < 0.5:  # horizontal flip, as MAE's augmentation
                batch = batch.flip(-1)
            loss = mae_loss(model, decoder, batch, mask_ratio, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss)
            first = last if first != first else first
            bar.set_postfix(loss=f"{last:.3f}")
            bar.update()
    bar.close()
    model.pos_embed.requires_grad_(True)
    model.eval()
    from prompttune.zoo._probe import linear_probe

    # SPT and VPT start from these features: a probe near chance would make SPT-vs-VPT untestable
    probe = linear_probe(model, 32, ZOO_MEAN, ZOO_STD)
    return {"images": len(images), "epochs": epochs, "steps": steps, "mask_ratio": mask_ratio,
            "first_loss": round(first, 4), "final_loss": round(last, 4), **probe}


zoo.register(zoo.ZooEntry(
    name="vit-mae-tiny", backbone="vit",
    description="timm ViT (4 blocks x 96, patch 4 @32px, avg pool + fc_norm), MAE-pretrained on synthetic-world images",
    make_model=make_tiny_vit, pretrain=pretrain_mae, version="1",
    info={"mean": ZOO_MEAN, "std": ZOO_STD},
    # A regression floor only, NOT the competence SPT-vs-VPT needs: the ridge probe measured 0.141
    # for this recipe and 0.154 for 5x its steps (4,096 images x 40 epochs), against 0.107 untrained
    # and chance 0.0625 (docs/zoo.md). Longer MAE pretraining does not fix it at this scale, nor did
    # five other MAE recipes (plain-background images, a 2x128 decoder, patch 8, unnormalised targets,
    # 3.3x the images seen: 0.11-0.15, raw pixels 0.182; docs/zoo.md): issue 16's 0.35 is not met.
    bars=(zoo.Bar("linear_probe_acc", min=0.12, why="better than the untrained ViT's 0.107"),),
))
