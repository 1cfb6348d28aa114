"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR 2023), for classification and retrieval.

Official code: muzairkhattak/multimodal-prompt-learning, ``trainers/maple.py``
(``MultiModalPromptLearner``, ``CustomCLIP``) and ``clip/model.py``
(``ResidualAttentionBlock_MaPLe``, ``VisionTransformer_MaPLe``); config
``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``. What it implements (paper Sec. 3.2-3.4):

* text prompts: ``n_ctx`` (2) learnable vectors replace the first ``n_ctx`` token embeddings
  after [SOS] of ``"<ctx_init> <class>."``; with ``ctx_init`` "a photo of a" and n_ctx = 2 they are
  initialised from "a photo" and the prompt still reads "a photo of a <class>." (official
  ``maple.py:84-92,121``: ``prompt_prefix = ctx_init`` whatever n_ctx is, when n_ctx <= 4); without
  init (or n_ctx > 4): N(0, 0.02^2) vectors and "X X <class>.";
* deep prompts (Eq. 5-6): layers ``1..prompt_depth-1`` of the text tower get their own
  ``n_ctx`` vectors ~ N(0, 0.02^2) at the same positions;
* vision-language coupling (Eq. 7): every visual prompt is a linear function of the text
  prompt of the same layer, ``proj(ctx)`` at the input (appended after the patches, before
  ``ln_pre``) and ``deep_proj[i](deep_text[i])`` at layer i (replacing the last n_ctx tokens);
  the ``prompt_depth - 1`` deep projections start as copies of one ``nn.Linear`` (``_get_clones``);
* logits = CLIP logit scale x cosine (``maple.py:197-199``), cross-entropy.

Trainable: exactly ``ctx``, ``proj``, the deep text prompts and the deep projections. Image
features depend on the prompts, so nothing is cached (``consumes = "images"``).

``maple_retrieval`` (DCAR's MaPLe baseline; DCAR's adaptation is not published, so ours):
the class name is replaced by the caption, ``[SOS] <ctx_init with its first n_ctx tokens
learned> <caption> [EOT]``, and the loss is the retrieval task's symmetric InfoNCE.

Departures: fp32 instead of the official fp16 (``PREC: fp16``, whose ``.half()`` casts are
CUDA-only); the widths of ``ctx``/``proj`` follow the backbone (the official code hard-codes
512 -> 768, ViT-B/16). The official warm-up (1 epoch at constant lr 1e-5, Dassl) is
``optim.warmup_type: constant``. See docs/maple.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from prompttune.backbones.clip import CLIPBackbone
from prompttune.config import ConfigError
from prompttune.methods import _clip_deep_prompts as deep
from prompttune.methods.base import Method
from prompttune.registry import METHODS


def init_context(backbone: CLIPBackbone, n_ctx: int, ctx_init: str | None, init_std: float = 0.02
                 ) -> tuple[torch.Tensor, str]:
    """(ctx [n_ctx, W_t], prompt prefix) as MaPLe's ``MultiModalPromptLearner.__init__``."""
    if n_ctx < 1:
        raise ValueError(f"MaPLe needs n_ctx >= 1, got {n_ctx}")
    if ctx_init and n_ctx <= 4:  # official maple.py:84: init from the words only for n_ctx <= 4
        ctx_init = ctx_init.replace("_", " ")
        with torch.no_grad():
            emb = backbone.token_embedding(backbone.tokenize([ctx_init]))
        n_words = int((backbone.tokenize([ctx_init])[0] > 0).sum()) - 2
        if n_words < n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} has {n_words} tokens, fewer than n_ctx={n_ctx}")
        return emb[0, 1:1 + n_ctx].float().clone(), ctx_init
    return torch.randn(n_ctx, backbone.text_width, device=backbone.device) * init_std, " ".join(["X"] * n_ctx)


def check_depth(backbone: CLIPBackbone, depth: int, key: str = "method.prompt_depth") -> None:
    text_l, vis_l = deep.tower_depths(backbone.model)
    if not 1 <= depth <= min(text_l, vis_l):
        raise ConfigError(f"{key}={depth}: must be in [1, {min(text_l, vis_l)}] for this backbone "
                          f"({text_l} text and {vis_l} vision blocks; official MaPLe uses 9 of 12)")


class MaPLeBase(Method):
    backbone_kind = CLIPBackbone
    consumes = "images"

    def __init__(self, n_ctx: int = 2, ctx_init: str | None = "a photo of a", prompt_depth: int = 9,
                 init_std: float = 0.02):
        super().__init__()
        self.n_ctx, self.ctx_init, self.depth, self.init_std = int(n_ctx), ctx_init or None, int(prompt_depth), init_std
        self.prompts: deep.CoupledPrompts | None = None
        self.prefix_text = ""

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        m = cfg.method
        if int(m.get("n_ctx", 2)) < 1:
            raise ConfigError(f"method.n_ctx={m.n_ctx}: MaPLe needs at least one context token")
        if int(m.get("prompt_depth", 9)) < 1:
            raise ConfigError(f"method.prompt_depth={m.prompt_depth}: must be >= 1 (1 = shallow prompts only)")

    def setup(self, backbone: CLIPBackbone, datamodule: Any) -> None:
        if not isinstance(backbone, CLIPBackbone):
            raise TypeError(f"{type(self).__name__} needs a CLIP backbone (backbone.name=clip), got {type(backbone).__name__}")
        check_depth(backbone, self.depth)
        ctx, self.prefix_text = init_context(backbone, self.n_ctx, self.ctx_init, self.init_std)
        self.prompts = deep.CoupledPrompts(ctx, deep.tower_widths(backbone.model)[1], self.depth)

    def encode_prompted_text(self, backbone: CLIPBackbone, tokens: torch.Tensor) -> torch.Tensor:
        """Text features of tokenised prompts whose positions 1..n_ctx are the learned context."""
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).float()
        ctx, deep_text = self.prompts.text()
        x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(tokens), -1, -1), emb[:, 1 + self.n_ctx:]], dim=1)
        return deep.encode_text(backbone.model, x, tokens, deep_text)

    def encode_prompted_image(self, backbone: CLIPBackbone, images: torch.Tensor) -> torch.Tensor:
        vctx, deep_vision = self.prompts.vision()
        return deep.encode_image(backbone.model, images, vctx, deep_vision)


@METHODS.register("maple")
class MaPLe(MaPLeBase):
    task = "classification"

    def setup(self, backbone: CLIPBackbone, datamodule: Any) -> None:
        super().setup(backbone, datamodule)
        names = [n.replace("_", " ") for n in datamodule.info()["classnames"]]
        self.register_buffer("tokens", backbone.tokenize([f"{self.prefix_text} {n}." for n in names]), persistent=False)

    def forward(self, backbone: CLIPBackbone, batch: dict[str, Any]) -> dict[str, Any]:
        txt = F.normalize(self.encode_prompted_text(backbone, self.tokens).float(), dim=-1)
        img = F.normalize(self.encode_prompted_image(backbone, batch["image"]).float(), dim=-1)
        return {"logits": backbone.logit_scale.float() * img @ txt.T}


@METHODS.register("maple_retrieval")
class MaPLeRetrieval(MaPLeBase):
    task = "retrieval"

    def _captions(self, backbone: CLIPBackbone, captions: list[str]) -> torch.Tensor:
        uniq = list(dict.fromkeys(captions))
        tokens = backbone.tokenize([f"{self.prefix_text} {c}" for c in uniq])
        feats = F.normalize(self.encode_prompted_text(backbone, tokens).float(), dim=-1)
        where = {c: i for i, c in enumerate(uniq)}
        return feats[torch.tensor([where[c] for c in captions], device=feats.device)]

    def forward(self, backbone: CLIPBackbone, batch: dict[str, Any]) -> dict[str, Any]:
        out = {"image_features": F.normalize(self.encode_prompted_image(backbone, batch["image"]).float(), dim=-1),
               "text_features": self._captions(backbone, list(batch["caption"])),
               "logit_scale": backbone.logit_scale.float()}
        negs = batch.get("negatives")
        if not self.training and negs and len(negs[0]):
            flat = [n for row in negs for n in row]
            out["neg_text_features"] = self._captions(backbone, flat).view(len(negs), len(negs[0]), -1)
        return out

