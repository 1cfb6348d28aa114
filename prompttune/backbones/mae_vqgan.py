"""MAE-VQGAN: the inpainting model of Bar et al., "Visual Prompting via Image Inpainting" (NeurIPS 2022).

A ViT MAE whose decoder predicts, for every patch, logits over the codebook of a VQGAN
tokenizer (Sec. 3 of the paper; ``models_mae.py`` of amirbar/visual_prompting and
Jackieam/InMeMo). The VQGAN (taming-transformers ``VQModel``) gives the targets
(``get_codebook_indices`` of the label canvas) and decodes predicted indices to pixels.

Written here from the architecture description, with the checkpoints' own key names, so the
files users have load as they are:

* the MAE checkpoint (e.g. the CVF 1000-epoch ``checkpoint-1000.pth``): ``{"model": state}``
  with ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,
  norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
  ``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred`` (``vae.*`` keys, if present, are the
  VQGAN's and are used when no separate VQGAN file is given);
* the VQGAN ``vqgan_imagenet_f16_1024`` Lightning checkpoint ``last.ckpt``: ``{"state_dict": ...}``
  with ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv``,
  ``post_quant_conv`` (the ``loss.*`` discriminator keys are ignored).

Pixel conventions: canvases are passed in [0, 1]. The MAE sees them ImageNet-normalised (as
the official evaluation does); the VQGAN sees ``2x - 1`` (its ``map_pixels`` applied to a
normalised canvas) and decodes to [0, 1] (``unmap_pixels``). The official *training* loop feeds
the MAE un-normalised canvases and tokenises the un-normalised label canvas; both are
selectable (``predict_logits(normalise=False)``, ``tokenize(official_unnormalised=True)``; the
methods' ``official_train_norm`` / ``official_target_norm``). The masked quadrant is given as a
fixed boolean token mask instead of an ``ids_shuffle`` permutation: the same visible set, in
the same order.

Presets: ``large`` (ViT-L/16, 24x1024, decoder 8x512, 224 px, VQGAN f16 with 1024 codes) and
``tiny`` (64 px canvases, patch 8, 3x96 encoder, 2x96 decoder, VQ f8 with 128 codes). The zoo
entry ``mae-vqgan-tiny`` (``prompttune/zoo/mae_vqgan_tiny.py``) is ``tiny`` with 512 codes,
pretrained by prompttune on synthetic-world canvases (``prompttune zoo build mae-vqgan-tiny``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prompttune import zoo
from prompttune.backbones.base import FrozenBackbone
from prompttune.registry import BACKBONES
from prompttune.utils import torch_load_trusted

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ============================================================================ VQGAN (taming layout)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, 1, 1)
        self.dropout = nn.Dropout(0.0)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v (taming's ``AttnBlock``)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).flatten(2).transpose(1, 2)
        k = self.k(h).flatten(2).transpose(1, 2)
        v = self.v(h).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as taming


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class VQEncoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, in_channels=3,
                 norm_groups=32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        res, cin = resolution, ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(cin, ch * m, norm_groups))
                cin = ch * m
                if res in attn_resolutions:
                    lvl.attn.append(AttnBlock(cin, norm_groups))
            if i != len(ch_mult) - 1:
                lvl.downsample = Downsample(cin)
                res //= 2
            self.down.append(lvl)
        self.mid = _Mid(cin, norm_groups)
        self.norm_out = _norm(cin, norm_groups)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class VQDecoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, out_ch=3,
                 norm_groups=32):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = _Mid(cin, norm_groups)
        ups = []
        for i in reversed(range(len(ch_mult))):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(cin, ch * ch_mult[i], norm_groups))
                cin = ch * ch_mult[i]
                if res in attn_resolutions:
                    lvl.attn.append(AttnBlock(cin, norm_groups))
            if i != 0:
                lvl.upsample = Upsample(cin)
                res *= 2
            ups.insert(0, lvl)  # stored low index = high resolution, as taming
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(cin, norm_groups)
        self.conv_out = nn.Conv2d(cin, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code per position: [B, D, h, w] -> [B, h*w]."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.T
        return dist.argmin(1).view(b, h * w)

    def lookup(self, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.embedding(idx).view(idx.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """taming-transformers ``VQModel`` (inference parts), same parameter names."""

    def __init__(self, n_embed=1024, embed_dim=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 attn_resolutions=(16,), resolution=256, z_channels=256, norm_groups=32):
        super().__init__()
        dd = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
                  resolution=resolution, z_channels=z_channels, norm_groups=norm_groups)
        self.encoder, self.decoder = VQEncoder(**dd), VQDecoder(**dd)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.factor = 2 ** (len(ch_mult) - 1)
        self.n_embed = n_embed

    def encode_pre_quant(self, x_pm1: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x_pm1))

    def codebook_indices(self, x01: torch.Tensor) -> torch.Tensor:
        return self.quantize.indices(self.encode_pre_quant(2 * x01 - 1))

    def decode_quant(self, q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(q))

    def decode_indices(self, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Indices [B, h*w] -> pixels in [0, 1] (``unmap_pixels``)."""
        return (self.decode_quant(self.quantize.lookup(idx, h, w)).clamp(-1, 1) + 1) / 2


# ============================================================================ MAE (models_mae layout)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of MAE (half the channels for rows, half for columns), cls row zeros."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def emb1d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE's get_2d_sincos_pos_embed: meshgrid(w, h) then the first half encodes grid[0] (= w)
    emb = np.concatenate([emb1d(gw), emb1d(gh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with timm's ``Block`` parameter names."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class MaskedAutoencoderViT(nn.Module):
    """MAE whose decoder predicts codebook logits (``decoder_pred``: dim -> vocab)."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, vocab_size=1024):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        g = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, g)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, g)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, vocab_size)
        self._init()

    def _init(self):
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x_norm: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Codebook logits [B, L, V] for a normalised image; ``masked`` [L] or [B, L] bool (True = hidden).

        A per-sample mask must hide the same number of tokens in every sample.
        """
        b = x_norm.shape[0]
        tok = self.patch_embed(x_norm) + self.pos_embed[:, 1:]
        L = tok.shape[1]
        if masked.dim() == 1:
            masked = masked.expand(b, L)
        keep = ~masked
        n_keep = int(keep[0].sum())
        if not bool((keep.sum(1) == n_keep).all()):
            raise ValueError("every sample must keep the same number of tokens")
        vis = tok[keep].view(b, n_keep, -1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        h = torch.cat([cls, vis], dim=1)
        for blk in self.blocks:
            h = blk(h)
        h = self.decoder_embed(self.norm(h))
        full = self.mask_token.expand(b, L, -1).clone()
        full[keep] = h[:, 1:].reshape(-1, h.shape[-1])
        d = torch.cat([h[:, :1], full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            d = blk(d)
        return self.decoder_pred(self.decoder_norm(d))[:, 1:]


# ============================================================================ the combined model

PRESETS: dict[str, dict[str, Any]] = {
    # Bar et al. / InMeMo: mae_vit_large_patch16 (dec512d8b) + vqgan_imagenet_f16_1024
    "large": dict(mae=dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                           decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, vocab_size=1024),
                  vq=dict(n_embed=1024, embed_dim=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                          attn_resolutions=(16,), resolution=256, z_channels=256, norm_groups=32)),
    # the offline zoo model: 64-px canvases, patch 8 (cells of 31 px, 1 px padding)
    "tiny": dict(mae=dict(img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=4, decoder_embed_dim=96,
                          decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0, vocab_size=128),
                 vq=dict(n_embed=128, embed_dim=32, ch=8, ch_mult=(1, 1, 2, 4), num_res_blocks=1,
                         attn_resolutions=(), resolution=64, z_channels=32, norm_groups=4)),
}


class MAEVQGAN(nn.Module):
    """The MAE and its VQGAN tokenizer, as one module (``mae.*`` and ``vqgan.*`` keys)."""

    def __init__(self, mae: dict, vq: dict):
        super().__init__()
        self.mae = MaskedAutoencoderViT(**mae)
        self.vqgan = VQGAN(**vq)
        if self.vqgan.factor != self.mae.patch_size:
            raise ValueError(f"the VQGAN downsamples by {self.vqgan.factor} but the MAE patch is {self.mae.patch_size}: "
                             "one codebook index per MAE patch needs them equal (set vq.ch_mult)")
        if self.vqgan.n_embed != self.mae.decoder_pred.out_features:
            raise ValueError(f"MAE vocab_size {self.mae.decoder_pred.out_features} != VQGAN n_embed {self.vqgan.n_embed}")


def make_model(arch: str | dict = "tiny", **overrides: Any) -> MAEVQGAN:
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise ValueError(f"unknown MAE-VQGAN preset {arch!r}; valid: {', '.join(PRESETS)}")
        spec = {k: dict(v) for k, v in PRESETS[arch].items()}
    else:
        spec = {k: dict(v) for k, v in arch.items()}
    for part in ("mae", "vq"):
        unknown = set(overrides.get(part, {})) - set(spec[part])
        if unknown:
            raise ValueError(f"unknown {part} option(s) {sorted(unknown)}; valid: {sorted(spec[part])}")
        spec[part].update(overrides.get(part, {}))
    return MAEVQGAN(spec["mae"], spec["vq"])


def _load_any(path: str | Path) -> dict:
    """A checkpoint as a dict, weights-only; ``argparse.Namespace`` (MAE's saved args) is allowed."""
    import argparse

    add = getattr(torch.serialization, "safe_globals", None)
    if add is None:
        return torch_load_trusted(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch_load_trusted(path)


def load_mae_state(model: MAEVQGAN, path: str | Path) -> dict[str, torch.Tensor]:
    """Load an MAE checkpoint by its own keys; returns its ``vae.*`` entries (if any) for the VQGAN."""
    ck = _load_any(path)
    state = ck.get("model", ck) if isinstance(ck, dict) else ck
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected an MAE checkpoint holding a state dict under 'model'")
    vae = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    mae = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("vae.")}
    try:
        missing, unexpected = model.mae.load_state_dict(mae, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path} does not match the MAE architecture: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not match the MAE architecture: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} (is the preset right? large = mae_vit_large_patch16)")
    return vae


def load_vqgan_state(model: MAEVQGAN, state_or_path: str | Path | dict) -> None:
    if isinstance(state_or_path, dict):
        state, where = state_or_path, "the MAE checkpoint's vae.* keys"
    else:
        ck = _load_any(state_or_path)
        state, where = (ck.get("state_dict", ck) if isinstance(ck, dict) else ck), str(state_or_path)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    try:
        missing, unexpected = model.vqgan.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{where} does not match the VQGAN architecture: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"{where} does not match the VQGAN architecture: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} (expected taming's VQModel keys: encoder.*, decoder.*, quantize.*)")


@BACKBONES.register("mae_vqgan")
class MAEVQGANBackbone(FrozenBackbone):
    """Frozen MAE-VQGAN with the hooks visual-ICL methods need.

    Weights: a zoo entry (``zoo_entry: mae-vqgan-tiny``), or the official files
    (``mae_checkpoint`` + ``vqgan_checkpoint``, with ``arch: large``), or ``weights: random``.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, arch: str = "tiny", zoo_entry: str | None = None, mae_checkpoint: str | None = None,
                 vqgan_checkpoint: str | None = None, weights: str = "pretrained", canvas_pad: int = 1,
                 overrides: dict | None = None, **_: Any):
        super().__init__()
        from prompttune.data.canvas import CanvasGeometry

        if weights not in ("pretrained", "random"):
            raise ValueError(f"backbone.weights must be 'pretrained' or 'random', not {weights!r}")
        self.weights = weights
        if zoo_entry:
            self.model = zoo.load_model(zoo_entry, weights)
            self.name = f"zoo:{zoo_entry}" + ("" if weights == "pretrained" else "(random)")
        else:
            self.model = make_model(arch, **(overrides or {}))
            self.name = f"mae-vqgan-{arch}"
            if weights == "pretrained":
                if not mae_checkpoint:
                    raise ValueError("backbone mae_vqgan with weights=pretrained needs mae_checkpoint (e.g. the CVF "
                                     "checkpoint-1000.pth) and vqgan_checkpoint (vqgan_imagenet_f16_1024 last.ckpt), "
                                     "or zoo_entry, or weights=random")
                vae = load_mae_state(self.model, mae_checkpoint)
                if vqgan_checkpoint:
                    load_vqgan_state(self.model, vqgan_checkpoint)
                elif vae:
                    load_vqgan_state(self.model, vae)
                else:
                    raise ValueError(f"{mae_checkpoint} holds no vae.* weights; give vqgan_checkpoint too")
                self.name += f":{Path(mae_checkpoint).name}"
            else:
                self.name += ":random"
        mae = self.model.mae
        self.image_size = mae.img_size
        self.geometry = CanvasGeometry(mae.img_size, mae.patch_size, int(canvas_pad))
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @property
    def vocab_size(self) -> int:
        return self.model.vqgan.n_embed

    def _check(self, canvas: torch.Tensor) -> None:
        s = self.image_size
        if canvas.dim() != 4 or canvas.shape[1:] != (3, s, s):
            raise ValueError(f"canvas must be [B, 3, {s}, {s}] for this MAE-VQGAN, got {list(canvas.shape)}")

    @torch.no_grad()
    def tokenize(self, canvas01: torch.Tensor, official_unnormalised: bool = False) -> torch.Tensor:
        """VQGAN codebook indices [B, L] of canvases in [0, 1].

        The VQGAN sees ``2x - 1``. ``official_unnormalised``: reproduce InMeMo's training targets,
        where ``map_pixels`` (``vqgan.py:1281``: ``2 * (x * std + mean) - 1``, written for an
        ImageNet-normalised input) receives the *un-normalised* label canvas
        (``train_models.py:183,239``), so the VQGAN sees a washed-out canvas in about
        [-0.19, 0.43] instead of [-1, 1].
        """
        self._check(canvas01)
        x = canvas01 * self._std + self._mean if official_unnormalised else canvas01
        return self.model.vqgan.codebook_indices(x)

    def predict_logits(self, canvas01: torch.Tensor, masked: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        """MAE codebook logits [B, L, V]; differentiable w.r.t. the canvas (never the weights).

        ``normalise=False`` feeds the [0, 1] canvas as it is, as InMeMo's training loop does
        (``train_models.py:235-237``; its evaluation normalises, ``val_vp_segmentation.py:132``).
        """
        self._check(canvas01)
        return self.model.mae((canvas01 - self._mean) / self._std if normalise else canvas01, masked)

    @torch.no_grad()
    def decode_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        g = self.geometry.grid
        out = self.model.vqgan.decode_indices(idx, g, g)
        if out.shape[-1] != self.image_size:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return out
