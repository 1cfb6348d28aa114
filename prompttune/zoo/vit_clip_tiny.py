"""Zoo entry ``vit-clip-tiny``: clip-tiny's image tower as a timm ViT, for VPT and SPT on a ViT
whose frozen features are competent.

SPT's claim is made on self-supervised ViTs (MAE, MoCo v3; PAPERS.md). At this scale neither gives
features a prompt can use (``vit-mae-tiny``'s probe 0.141 against 0.117 untrained; MoCo v3 0.193;
docs/zoo.md), so SPT vs VPT on them says nothing about SPT. This entry is the control: the same
methods on a ViT whose pooled features separate the classes (ridge probe 0.557), trained
here with language supervision, not self-supervision -- a departure from the paper's backbones
that docs/visual_prompt_tuning.md states beside every number measured on it.

No training: the build converts clip-tiny v4's ``visual`` (open_clip ``VisionTransformer``:
``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, residual blocks of
``nn.MultiheadAttention`` + MLP, ``ln_post``) into timm's ``VisionTransformer`` with
``pre_norm=True`` (timm's ``norm_pre`` is ``ln_pre``; no patch bias), LayerNorm eps 1e-5 as
open_clip's, CLS pooling. The projection ``proj`` is dropped: VPT and SPT put their own head on
the pooled feature. The build checks that the converted model reproduces clip-tiny's pooled,
pre-projection feature on the probe images (``parity_max_abs``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prompttune import zoo
from prompttune.backbones.base import FrozenBackbone
from prompttune.zoo.clip_tiny import TINY_CLIP

SOURCE = "clip-tiny"
CLIP_MEAN, CLIP_STD = FrozenBackbone.mean, FrozenBackbone.std  # CLIP's statistics, as clip-tiny was trained


def make_vit_clip() -> nn.Module:
    from prompttune.backbones.vit import _timm

    _timm()  # the torchvision shim first
    from timm.models.vision_transformer import VisionTransformer

    v = TINY_CLIP["vision_cfg"]
    return VisionTransformer(img_size=v["image_size"], patch_size=v["patch_size"], embed_dim=v["width"],
                             depth=v["layers"], num_heads=v["width"] // v["head_width"], mlp_ratio=v["mlp_ratio"],
                             qkv_bias=True, pre_norm=True, global_pool="token", num_classes=0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-5))


def clip_visual_to_timm(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` state -> timm ``VisionTransformer`` state (no head)."""
    s = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    out = {"cls_token": s["class_embedding"].reshape(1, 1, -1),
           "pos_embed": s["positional_embedding"].unsqueeze(0),
           "patch_embed.proj.weight": s["conv1.weight"],
           "norm_pre.weight": s["ln_pre.weight"], "norm_pre.bias": s["ln_pre.bias"],
           "norm.weight": s["ln_post.weight"], "norm.bias": s["ln_post.bias"]}
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
             "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    for key, value in s.items():
        if not key.startswith("transformer.resblocks."):
            continue
        i, rest = key[len("transformer.resblocks."):].split(".", 1)
        for a, b in names.items():
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        out[f"blocks.{i}.{rest}"] = value
    return out


@torch.no_grad()
def pooled_pre_projection(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """clip's own pooled image feature before ``proj`` (what the converted ViT must reproduce)."""
    proj, visual.proj = visual.proj, None
    try:
        return visual(images)
    finally:
        visual.proj = proj


def convert_clip_tiny(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Fill ``model`` with clip-tiny's image tower (built first if it is not) and probe it."""
    from prompttune.zoo._probe import linear_probe, probe_images

    clip = zoo.load_model(SOURCE, "pretrained")
    model.load_state_dict(clip_visual_to_timm(clip.visual), strict=True)
    model.eval()
    x = probe_images(32, CLIP_MEAN, CLIP_STD)["test_x"][:64]
    parity = float((model(x) - pooled_pre_projection(clip.visual.eval(), x)).abs().max())
    probe = linear_probe(model, 32, CLIP_MEAN, CLIP_STD)
    return {"parity_max_abs": parity, **probe}


zoo.register(zoo.ZooEntry(
    name="vit-clip-tiny", backbone="vit",
    description="clip-tiny's image tower (ViT 4x128, patch 8 @32px, CLS pooling) converted to timm, no projection: "
                "the competent-ViT control for VPT vs SPT",
    make_model=make_vit_clip, pretrain=convert_clip_tiny, version="1",
    info={"mean": CLIP_MEAN, "std": CLIP_STD}, needs=(SOURCE,),
    bars=(zoo.Bar("parity_max_abs", max=1e-4, why="the converted ViT reproduces clip-tiny's pooled feature"),
          zoo.Bar("linear_probe_acc", min=0.5, why="clip-tiny's own bar: features that separate the 16 classes")),
))
