"""Frozen timm Vision Transformer, with the hooks visual-prompt methods need.

Weights, in order of precedence:

* ``zoo_entry: vit-mae-tiny`` -- a small ViT pretrained MAE-style by prompttune on the
  synthetic world (offline; see :func:`pretrain_mae` below);
* ``checkpoint: path`` -- a local file, loaded weights-only, in one of the formats users
  actually have (``checkpoint_format: auto`` detects it):

  - ``mae``: Meta's ``mae_pretrain_vit_base.pth`` (``{"model": encoder state}``; the
    encoder's final ``norm`` becomes timm's ``fc_norm`` when pooling is ``avg``, as the
    SPT official code applies that norm after the mean of the patch tokens);
  - ``moco``: MoCo-v3 (``{"state_dict": {"module.base_encoder.<timm key>": ...}}``; the
    momentum encoder, predictor and projection ``head`` are dropped);
  - ``timm``: a plain timm state dict (``.pth``/``.bin``/``.safetensors``; ``module.``
    prefixes stripped, classifier ``head`` dropped), e.g. a saved supervised
    ``vit_base_patch16_224.augreg_in21k``;
  - ``npz``: the original JAX ``.npz`` (e.g. ``ViT-B_16.npz`` of ImageNet-21k), through
    timm's own converter;

* ``model: <timm name>`` (``model_kwargs`` override its architecture arguments) with ``pretrained: <tag>`` (``augreg_in21k``, ``mae``, ...) or
  ``pretrained: true`` (the name's default tag): downloads, for users online.

Pooling (``pool``): ``auto`` follows the pretraining -- MAE (and the zoo MAE): mean of
the patch tokens, then ``fc_norm``; MoCo-v3 and supervised: the final ``norm`` then the
CLS token. ``cls`` / ``avg`` force one.

Hooks (used by ``methods/_vit_prompts.py``; no method logic lives here):
``patch_tokens`` (SPT's layer 0), ``embed_tokens`` (prefix tokens + patches with position
embeddings), ``blocks``, ``pool_tokens`` (final norm + pooling), ``layer_tokens`` (the
inputs of every block, for prototypes), and ``encode_image`` (pooled features, what
``linear_probe`` reads).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from prompttune.backbones import zoo
from prompttune.backbones.base import FrozenBackbone
from prompttune.registry import BACKBONES
from prompttune.utils import torch_load_trusted

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("auto", "mae", "moco", "timm", "npz")
POOLS = ("auto", "cls", "avg")


def _timm():
    import prompttune._tvshim  # noqa: F401  (timm imports torchvision)
    import timm

    return timm


# ------------------------------------------------------------------ checkpoint formats
def detect_format(path: Path, state: Any) -> str:
    if path.suffix == ".npz":
        return "npz"
    if isinstance(state, dict):
        inner = state.get("state_dict", state)
        if isinstance(inner, dict) and any(str(k).startswith("module.base_encoder.") for k in inner):
            return "moco"
        if "model" in state and isinstance(state["model"], dict):
            return "mae"
    return "timm"


def convert_state_dict(state: Any, fmt: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a checkpoint of format ``fmt`` onto the timm ``model``'s key names."""
    if not isinstance(state, dict):
        raise ValueError(f"a {fmt} checkpoint must hold a dict, got {type(state).__name__}")
    if fmt == "mae":
        if "model" not in state:
            raise ValueError("MAE checkpoint must hold {'model': state_dict} like mae_pretrain_vit_base.pth; "
                             f"found keys {sorted(state)[:5]}")
        sd = dict(state["model"])
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    elif fmt == "moco":
        inner = state.get("state_dict", state)
        prefix = "module.base_encoder."
        sd = {k[len(prefix):]: v for k, v in inner.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"MoCo-v3 checkpoint has no keys under {prefix!r}; found e.g. {list(inner)[:3]}")
    elif fmt == "timm":
        sd = state.get("state_dict", state.get("model", state)) if ("state_dict" in state or "model" in state) else state
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    else:
        raise ValueError(f"unknown checkpoint_format {fmt!r}; valid: {', '.join(FORMATS)}")
    # classifier / projection heads belong to the pretraining task, not to the backbone
    sd = {k: v for k, v in sd.items() if not k.startswith("head.") and k != "head"}
    # an encoder-final `norm` goes to `fc_norm` where the model pools first (avg pooling)
    own = model.state_dict()
    if "norm.weight" in sd and "norm.weight" not in own and "fc_norm.weight" in own:
        sd["fc_norm.weight"] = sd.pop("norm.weight")
        sd["fc_norm.bias"] = sd.pop("norm.bias")
    if "fc_norm.weight" in sd and "fc_norm.weight" not in own and "norm.weight" in own:
        sd["norm.weight"] = sd.pop("fc_norm.weight")
        sd["norm.bias"] = sd.pop("fc_norm.bias")
    # a checkpoint trained at another resolution: resample its position embeddings
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(grid), num_prefix_tokens=n_prefix)
    return sd


def load_checkpoint_into(model: nn.Module, path: str | Path, fmt: str = "auto", state: Any = None) -> str:
    """Load ``path`` into the timm ViT ``model``; returns the format used. Strict on every encoder key.

    ``state``: the already-loaded checkpoint (saves reading a large file twice)."""
    path = Path(path).expanduser()
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint_format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"ViT checkpoint not found: {path}")
    if fmt == "npz" or (fmt == "auto" and path.suffix == ".npz"):
        model.load_pretrained(str(path))
        return "npz"
    if state is None:
        state = torch_load_trusted(path)
    if fmt == "auto":
        fmt = detect_format(path, state)
    sd = convert_state_dict(state, fmt, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(
            f"{path} ({fmt} format) does not match the ViT architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; check `model` (depth, width, patch size) and `checkpoint_format`"
        )
    return fmt


# ------------------------------------------------------------------ the wrapper
@BACKBONES.register("vit")
class ViTBackbone(FrozenBackbone):
    def __init__(self, model: str | None = "vit_base_patch16_224", pretrained: str | bool | None = None,
                 checkpoint: str | None = None, checkpoint_format: str = "auto", pool: str = "auto",
                 zoo_entry: str | None = None, weights: str = "pretrained", img_size: int | None = None,
                 mean: Iterable[float] | None = None, std: Iterable[float] | None = None,
                 drop_path_rate: float = 0.0, model_kwargs: dict | None = None, **_: Any):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"backbone.pool must be one of {', '.join(POOLS)}, not {pool!r}")
        if checkpoint_format not in FORMATS:
            raise ValueError(f"backbone.checkpoint_format must be one of {', '.join(FORMATS)}, not {checkpoint_format!r}")
        if weights not in ("pretrained", "random"):
            raise ValueError(f"backbone.weights must be 'pretrained' or 'random', not {weights!r}")
        timm = _timm()
        norm_mean, norm_std = IMAGENET_MEAN, IMAGENET_STD
        if zoo_entry:
            self.model = zoo.load_model(zoo_entry, weights)
            self.name = f"zoo:{zoo_entry}" + ("" if weights == "pretrained" else f"({weights})")
            norm_mean, norm_std = ZOO_MEAN, ZOO_STD
            if pool != "auto":
                self.model.global_pool = "token" if pool == "cls" else "avg"
        else:
            if not model:
                raise ValueError("backbone.model must name a timm ViT (e.g. vit_base_patch16_224) or set zoo_entry")
            fmt, state = checkpoint_format, None
            if checkpoint and weights == "pretrained":
                p = Path(checkpoint).expanduser()
                if not p.is_file():
                    raise FileNotFoundError(f"ViT checkpoint not found: {p}")
                if fmt == "npz" or p.suffix == ".npz":
                    fmt = "npz"
                else:
                    state = torch_load_trusted(p)
                    fmt = detect_format(p, state) if fmt == "auto" else fmt
            elif weights == "pretrained" and not pretrained:
                raise ValueError(f"backbone.weights=pretrained but {model!r} has no source of weights: set "
                                 "backbone.pretrained (a timm tag, or true), backbone.checkpoint, or backbone.zoo_entry "
                                 "(or weights=random for an untrained model)")
            want = pool if pool != "auto" else ("avg" if fmt == "mae" else None)
            kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": drop_path_rate}
            if want:
                kwargs["global_pool"] = "token" if want == "cls" else "avg"
            if img_size:
                kwargs["img_size"] = int(img_size)
            kwargs.update(dict(model_kwargs or {}))  # architecture overrides (depth, embed_dim, patch_size, ...)
            tag = pretrained if (weights == "pretrained" and not checkpoint) else None
            name = f"{model}.{tag}" if isinstance(tag, str) and "." not in model else model
            if name.split(".")[0] not in timm.list_models():
                raise ValueError(f"unknown timm model {model!r}; e.g. {', '.join(timm.list_models('vit_base*')[:4])}")
            self.model = timm.create_model(name, pretrained=bool(tag), **kwargs)
            if state is not None or fmt == "npz" and checkpoint and weights == "pretrained":
                fmt = load_checkpoint_into(self.model, checkpoint, fmt, state)
                self.name = f"{model}:{Path(checkpoint).name}({fmt})"
                del state
            else:
                self.name = f"{model}:{tag if tag else 'random'}"
            cfg = getattr(self.model, "pretrained_cfg", {}) or {}
            if tag and cfg.get("mean"):
                norm_mean, norm_std = tuple(cfg["mean"]), tuple(cfg["std"])
        if not hasattr(self.model, "blocks") or not hasattr(self.model, "patch_embed"):
            raise ValueError(f"{self.name} is not a ViT with patch_embed and blocks")
        if getattr(self.model, "attn_pool", None) is not None:
            raise ValueError(f"{self.name} pools with attention ('map'); prompt insertion supports cls/avg pooling only")
        self.mean = tuple(mean) if mean else tuple(norm_mean)
        self.std = tuple(std) if std else tuple(norm_std)
        size = self.model.patch_embed.img_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.freeze()

    # -- facts methods read -------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def patch_size(self) -> int:
        p = self.model.patch_embed.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    @property
    def pool(self) -> str:
        return "cls" if self.model.global_pool == "token" else "avg"

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    # -- hooks --------------------------------------------------------------------
    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, D]: the patch embeddings before position embeddings (SPT's layer 0)."""
        x = self.model.patch_embed(images)
        return x.flatten(1, 2) if x.ndim == 4 else x

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, prefix + N, D]: what the first block sees (prefix tokens, position embeddings, pre-norm)."""
        m = self.model
        x = m._pos_embed(m.patch_embed(images))
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def pool_tokens(self, x: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """The final norm and pooling of the last block's output [B, T, D] -> [B, D].

        ``avg`` averages every token after the prefix tokens except the first ``skip`` of
        them (prompt methods pass their prompt count to leave prompts out of the mean).
        """
        m = self.model
        x = m.norm(x)
        if m.global_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, self.num_prefix_tokens + skip:].mean(dim=1)
        return m.fc_norm(x)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(images)
        return self.pool_tokens(self.model.blocks(x))

    def layer_tokens(self, images: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """{i: [B, N, D]} for SPT's prototypes: layer 0 = ``patch_tokens``, layer i = output of
        block i-1 without the prefix (CLS/register) tokens. Runs only as deep as needed."""
        layers = sorted(set(int(i) for i in layers))
        if not layers:
            return {}
        if layers[0] < 0 or layers[-1] > self.depth:
            raise ValueError(f"layer indices must lie in 0..{self.depth}, got {layers}")
        out: dict[int, torch.Tensor] = {}
        if 0 in layers:
            out[0] = self.patch_tokens(images)
        if layers[-1] == 0:
            return out
        x = self.embed_tokens(images)
        for i, blk in enumerate(self.model.blocks[: layers[-1]]):
            x = blk(x)
            if i + 1 in layers:
                out[i + 1] = x[:, self.num_prefix_tokens:]
        return out


# ------------------------------------------------------------------ zoo: vit-mae-tiny
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
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One MAE step (Eq. of Sec. 3): encode a random 25% of the patches, reconstruct the
    per-patch normalised pixels of the masked ones, MSE on masked patches only."""
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
    target = (target - mean) / (var + 1e-6) ** 0.5
    mask = torch.ones(b, n, device=images.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def pretrain_mae(model: nn.Module, folder: Path, n_per_class: int = 128, epochs: int = 15, batch_size: int = 256,
                 lr: float = 2e-3, mask_ratio: float = 0.75, seed: int = 0) -> dict[str, Any]:
    """MAE pretraining of the zoo ViT on synthetic-world images (no labels are used).

    As MAE: fixed sin-cos position embeddings, 75% masking, normalised-pixel targets,
    AdamW (betas 0.9/0.95, wd 0.05), warm-up + cosine. Small: a 1-block 64-d decoder, 15 epochs over 2,048 images.
    """
    from tqdm.auto import tqdm

    from prompttune.config import cache_dir
    from prompttune.data.base import ImageTransform, read_image
    from prompttune.data.image_folder import ensure_synthetic, read_split_file

    root = cache_dir() / "data" / f"world-mae-{n_per_class}-s{seed}"
    ensure_synthetic({"kind": "classification", "n_train": n_per_class, "n_val": 0, "n_test": 0, "side": 32,
                      "seed": 1000 + seed, "background": "noise"}, root)
    rows = read_split_file(root / "split_prompttune_world.json")["train"]
    tf = ImageTransform(32, ZOO_MEAN, ZOO_STD)
    images = torch.stack([tf(read_image(root / "images" / r[0])) for r in rows])
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
    return {"images": len(images), "epochs": epochs, "mask_ratio": mask_ratio,
            "first_loss": round(first, 4), "final_loss": round(last, 4)}


zoo.register(zoo.ZooEntry(
    name="vit-mae-tiny", backbone="vit",
    description="timm ViT (4 blocks x 96, patch 4 @32px, avg pool + fc_norm), MAE-pretrained on synthetic-world images",
    make_model=make_tiny_vit, pretrain=pretrain_mae, version="1",
))
