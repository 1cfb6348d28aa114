"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022; official code KMnP/vpt).

What it implements:

* prompt tokens inserted after the CLS token, after the position embeddings
  (Sec. 3.2, Eq. 4 shallow / Eq. 5-6 deep, Fig. 2): shallow ``[1, P, D]`` enters the first
  block; deep ``[L, P, D]`` replaces the prompt slice before every block
  (``methods/_vit_prompts.prompted_forward``);
* random initialisation as in the official code: ``U(-v, v)``, ``v = sqrt(6 / (3·p² + D))``
  with p the patch size (Xavier uniform over the patch projection's fan-in + fan-out);
* prompt dropout (official ``PROMPT.DROPOUT``, default 0.0, ``src/configs/config.py:74``),
  applied after the prompts are expanded to the batch, so every sample draws its own mask
  (``src/models/vit_prompt/vit.py:82,114``);
* a linear head on the pooled feature (the official "cls" head; a single linear layer
  as in the paper's ViT-B experiments).

Trainable: exactly the prompts and the head. The backbone runs in eval mode with frozen
weights; gradients flow through the blocks to the prompts only.

Departures:

* Pooling follows the backbone's pretraining (``ViTBackbone.pool``): CLS for
  supervised/MoCo, mean of the non-CLS tokens + ``fc_norm`` for MAE. With avg pooling the
  prompt tokens are part of the mean by default (``pool_prompts: true``), as the MAE
  prompt code of both KMnP/vpt and the SPT repo does; ``false`` averages patches only.
* Optimiser groups follow the SPT official code (prompts with ``weight_decay``, the
  head weight with ``head_weight_decay``, biases undecayed), so that vpt and spt differ
  only in the initialisation. The official VPT uses SGD (momentum 0.9) with one decay;
  ``configs/method/vpt.yaml`` sets SGD.
* The head init is ``trunc_normal(head_init_std)`` (0.02, timm's and SPT's; 0.01 in SPT's MoCo
  script), zero bias, not VPT's MLP-head init.
* VPT's lr is ``base_lr × batch / 256`` (``tune_fgvc.py:31``); prompttune takes the effective
  lr, so a card states the product (``experiments/paper/vpt_cub.yaml``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prompttune.backbones.vit import ViTBackbone
from prompttune.config import ConfigError
from prompttune.methods._vit_prompts import (ClassifierHead, check_number, check_vit, head_param_groups,
                                             num_classes_of, prompted_forward, vpt_uniform_)
from prompttune.methods.base import Method
from prompttune.registry import METHODS


@METHODS.register("vpt")
class VPT(Method):
    task = "classification"
    backbone_kind = ViTBackbone
    consumes = "images"

    def __init__(self, num_prompts: int = 50, deep: bool = False, prompt_dropout: float = 0.0,
                 pool_prompts: bool = True, head_weight_decay: float | None = None, head_init_std: float = 0.02,
                 **kw: Any):
        super().__init__()
        if int(num_prompts) < 1:
            raise ValueError(f"{self.registry_name}.num_prompts must be >= 1, got {num_prompts}")
        if not 0.0 <= float(prompt_dropout) < 1.0:
            raise ValueError(f"{self.registry_name}.prompt_dropout must lie in [0, 1), got {prompt_dropout}")
        self.num_prompts, self.deep = int(num_prompts), bool(deep)
        self.pool_prompts = bool(pool_prompts)
        self.head_weight_decay = head_weight_decay
        self.head_init_std = float(head_init_std)
        self.dropout = nn.Dropout(float(prompt_dropout))
        self.prompts: nn.Parameter | None = None
        self.head: ClassifierHead | None = None
        self._extra_init_args(**kw)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        m = cfg.method
        check_number(m, "num_prompts", lo=1, integer=True)
        check_number(m, "prompt_dropout", lo=0.0, hi=1.0, hi_open=True)
        check_number(m, "head_init_std", lo=0.0, lo_open=True)
        check_number(m, "head_weight_decay", lo=0.0, allow_none=True)
        if "deep" in m and not isinstance(m.deep, bool):
            raise ConfigError(f"method.deep={m.deep!r}: expected true or false")

    def _extra_init_args(self, **kw: Any) -> None:
        if kw:
            raise TypeError(f"unknown {self.registry_name} option(s): {', '.join(sorted(kw))}")

    # -- setup ---------------------------------------------------------------------
    def prompt_layers(self, backbone: ViTBackbone) -> list[int]:
        """The layers that get a prompt set: 0 only (shallow), or 0..L-1 (deep)."""
        return list(range(backbone.depth)) if self.deep else [0]

    def initial_prompts(self, backbone: ViTBackbone, datamodule: Any) -> torch.Tensor:
        n = len(self.prompt_layers(backbone))
        seed = int(getattr(datamodule, "seed", 0) or 0)
        g = torch.Generator().manual_seed(seed)
        return vpt_uniform_(torch.empty(n, self.num_prompts, backbone.embed_dim), backbone.patch_size,
                            backbone.embed_dim, g)

    def setup(self, backbone: Any, datamodule: Any) -> None:
        backbone = check_vit(backbone, self.registry_name)
        n_cls = num_classes_of(datamodule, self.registry_name)
        init = self.initial_prompts(backbone, datamodule)
        want = (len(self.prompt_layers(backbone)), self.num_prompts, backbone.embed_dim)
        if tuple(init.shape) != want:
            raise RuntimeError(f"prompt init has shape {tuple(init.shape)}, expected {want}")
        device = backbone.device
        self.prompts = nn.Parameter(init.to(device))
        self.head = ClassifierHead(backbone.embed_dim, n_cls, self.head_init_std).to(device)

    # -- forward -------------------------------------------------------------------
    def forward(self, backbone: Any, batch: dict[str, Any]) -> dict[str, Any]:
        if self.prompts is None:
            raise RuntimeError(f"{self.registry_name}: call setup(backbone, datamodule) before forward")
        feats = prompted_forward(backbone, batch["image"], self.prompts, self.deep, self.dropout, self.pool_prompts)
        return {"logits": self.head(feats)}

    def param_groups(self, cfg: Any) -> list[dict[str, Any]]:
        return head_param_groups([self.prompts], self.head, cfg, self.head_weight_decay)
