"""Retrieval baselines for DCAR's tables: zero-shot CLIP and CoOp on captions.

* ``zero_shot_retrieval``: frozen CLIP, captions encoded as written (Radford et al., 2021);
  nothing is trained.
* ``coop_retrieval``: CoOp (Zhou et al., IJCV 2022, Eq. 2) on captions with CoOp's own
  settings: one learned context shared by all captions, *before* the caption
  (``[SOT] [V]_1..[V]_M caption [EOT]``, ``ctx_position: front``, as CoOp puts it before the
  class name), initialised from a phrase or N(0, 0.02^2), SGD (CoOp: lr 0.002, momentum 0.9,
  weight decay 5e-4, cosine, one warm-up epoch; ``configs/method/coop_retrieval.yaml``),
  trained with CLIP's symmetric InfoNCE over the batch. It is
  :class:`~prompttune.methods.dual_prompt_text.DualPromptText` with the sub-category prompt,
  the token re-weighting and the hard negatives off. Departures from CoOp: a free-form
  caption replaces the class name and the loss is the retrieval one (CoOp's is
  classification cross-entropy); ``ctx_position: end`` (context after the caption) is kept
  as an option, not CoOp's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from prompttune.backbones.clip import CLIPBackbone
from prompttune.methods.base import Method
from prompttune.methods.dual_prompt_text import DualPromptText
from prompttune.registry import METHODS


@METHODS.register("zero_shot_retrieval")
class ZeroShotRetrieval(Method):
    trains = False  # evaluation only: method.optim.epochs is 0
    task = "retrieval"
    backbone_kind = CLIPBackbone
    consumes = "image_features"

    def setup(self, backbone, datamodule) -> None:
        if not isinstance(backbone, CLIPBackbone):
            raise TypeError(f"zero_shot_retrieval needs a CLIP backbone (backbone.name=clip), got {type(backbone).__name__}")

    @torch.no_grad()
    def _encode(self, backbone, captions: list[str]) -> torch.Tensor:
        uniq = list(dict.fromkeys(captions))
        feats = F.normalize(backbone.encode_text(backbone.tokenize(uniq)).float(), dim=-1)
        where = {c: i for i, c in enumerate(uniq)}
        return feats[torch.tensor([where[c] for c in captions], device=feats.device)]

    def forward(self, backbone, batch: dict[str, Any]) -> dict[str, Any]:
        out = {"image_features": F.normalize(batch["features"].float(), dim=-1),
               "text_features": self._encode(backbone, list(batch["caption"])),
               "logit_scale": backbone.logit_scale.float()}
        negs = batch.get("negatives")
        if negs and len(negs[0]):
            flat = [n for row in negs for n in row]
            out["neg_text_features"] = self._encode(backbone, flat).view(len(negs), len(negs[0]), -1)
        return out


@METHODS.register("coop_retrieval")
class CoOpRetrieval(DualPromptText):
    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, ctx_position: str = "front", init_std: float = 0.02):
        if not ctx_init and n_ctx < 1:
            raise ValueError("coop_retrieval needs n_ctx >= 1 or a ctx_init phrase")
        super().__init__(n_attr_ctx=n_ctx, attr_init=ctx_init, n_cat_ctx=0, init_std=init_std, attr_position=ctx_position,
                         token_reweight=False,
                         hard_negatives=False, category_weighting=False)
