"""LoRA baseline: low-rank adapters on the frozen ViT's attention (Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", ICLR 2022, Eq. 3: ``h = W0 x + (alpha / r) · B A x``,
A Kaiming-uniform, B zero, so training starts at the frozen model). The standard PEFT reference
point beside VPT / SPT.

Two modes (``mode``):

* ``qv`` (default) -- the paper's setting (Sec. 4.2 and 7.1: adapt ``W_q`` and ``W_v`` only). timm
  fuses the three projections into one ``qkv`` linear layer ``[3D, D]`` whose rows are q, then k,
  then v (``Attention.forward`` reshapes to ``(B, N, 3, heads, head_dim)``); :class:`QVLoRA`
  wraps that layer and adds *separate* rank-r updates to the q rows and to the v rows:
  ``qkv(x) + s · [B_q A_q x, 0, B_v A_v x]``. The k rows are the frozen layer's, exactly.
* ``peft`` -- peft's LoRA on whole linear layers named by ``target_modules`` (default
  ``[qkv]``). On timm's fused ``qkv`` this is *one* rank-r update ``[3D, r]·[r, D]`` shared by
  q, k and v, with k adapted too: the pre-issue-13 behaviour, kept selectable (and the way to
  adapt other layers, e.g. ``[qkv, proj, fc1, fc2]``).

Both have ``4·r·D`` adapter parameters per block on the fused ``qkv``
(qv: ``2·(r·D + D·r)``; peft: ``r·D + 3D·r``), plus the head.

How it stays within the framework's contract (the backbone owns the frozen weights, the
method owns only what it trains): the adapted layers are wrapped inside the backbone's model
(by :class:`QVLoRA`, or by ``peft.inject_adapter_in_model``), and their new ``A`` / ``B``
sub-layers are registered *also* as submodules of this method (``self.adapters``). They are
the same ``nn.Linear`` objects, so the optimiser (built over ``method.parameters()``), the
module's "only the method trains" check and the trainable-only checkpoints (``method.*``
keys) see exactly the adapters and the head. Nothing of the base model is copied or unfrozen.
``forward`` is the backbone's ordinary ``encode_image`` then the linear head.

Departures / notes:

* The backbone stays in eval mode (framework contract), so LoRA dropout would be inert:
  ``dropout`` > 0 is rejected at compose time rather than silently ignored.
* The wrapped layers live inside the run's backbone object: one backbone serves one LoRA
  method (a second ``setup`` on the same backbone is rejected with a clear error).
* ``total_params`` of a run counts the adapters twice (once in the backbone, once in the
  method); ``trainable_params`` is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from prompttune.backbones.vit import ViTBackbone
from prompttune.config import ConfigError
from prompttune.methods._vit_prompts import ClassifierHead, check_number, check_vit, head_param_groups, num_classes_of
from prompttune.methods.base import Method
from prompttune.registry import METHODS

ADAPTER_NAME = "prompttune"
MODES = ("qv", "peft")


def low_rank_pair(d_in: int, d_out: int, r: int) -> tuple[nn.Linear, nn.Linear]:
    """LoRA's A [r, d_in] (Kaiming-uniform, a=sqrt(5), as nn.Linear and peft) and B [d_out, r] (zeros)."""
    a, b = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


class QVLoRA(nn.Module):
    """timm's fused ``qkv`` linear layer with separate LoRA updates on its q and v rows (k untouched)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        if base.out_features != 3 * base.in_features:
            raise ValueError(f"expected a fused qkv layer [3D, D], got [{base.out_features}, {base.in_features}]")
        self.base, self.dim, self.scaling = base, base.in_features, float(alpha) / int(r)
        self.q_A, self.q_B = low_rank_pair(self.dim, self.dim, r)
        self.v_A, self.v_B = low_rank_pair(self.dim, self.dim, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dq = self.q_B(self.q_A(x)) * self.scaling
        dv = self.v_B(self.v_A(x)) * self.scaling
        return self.base(x) + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


@METHODS.register("lora")
class LoRA(Method):
    task = "classification"
    backbone_kind = ViTBackbone
    consumes = "images"

    def __init__(self, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, mode: str = "qv",
                 target_modules: list[str] | tuple[str, ...] | None = None, head_weight_decay: float | None = None,
                 head_init_std: float = 0.02):
        super().__init__()
        if int(r) < 1:
            raise ConfigError(f"lora.r={r!r}: must be >= 1")
        if mode not in MODES:
            raise ConfigError(f"lora.mode={mode!r}: expected one of {', '.join(MODES)}")
        if mode == "qv" and target_modules:
            raise ConfigError(f"lora.target_modules={list(target_modules)!r} is inert with mode=qv (which adapts the "
                              "q and v slices of every block's fused qkv); use mode=peft to name layers")
        if mode == "peft" and target_modules is not None and not target_modules:
            raise ConfigError("lora.target_modules is empty: name at least one layer, e.g. [qkv]")
        self.r, self.alpha, self.dropout, self.mode = int(r), float(alpha), float(dropout), mode
        self.target_modules = [str(t) for t in (target_modules or ["qkv"])]
        self.head_weight_decay, self.head_init_std = head_weight_decay, float(head_init_std)
        self.adapters = nn.ModuleDict()
        self.head: ClassifierHead | None = None

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        m = cfg.method
        check_number(m, "r", lo=1, integer=True)
        check_number(m, "alpha", lo=0.0, lo_open=True)
        check_number(m, "head_init_std", lo=0.0, lo_open=True)
        check_number(m, "head_weight_decay", lo=0.0, allow_none=True)
        if m.get("mode", "qv") not in MODES:
            raise ConfigError(f"method.mode={m.mode!r}: expected one of {', '.join(MODES)}")
        if float(m.get("dropout", 0.0) or 0.0) != 0.0:
            raise ConfigError(f"method.dropout={m.dropout!r}: LoRA dropout would be inert (the frozen backbone "
                              "stays in eval mode); expected 0")
        if m.get("mode", "qv") == "qv" and m.get("target_modules"):
            raise ConfigError(f"method.target_modules={list(m.target_modules)!r} is inert with method.mode=qv; "
                              "set method.mode=peft to adapt named layers, or target_modules=null")

    def setup(self, backbone: Any, datamodule: Any) -> None:
        backbone = check_vit(backbone, "lora")
        n_cls = num_classes_of(datamodule, "lora")
        model = backbone.model
        if any(isinstance(m, QVLoRA) for m in model.modules()) or any(
                type(m).__module__.startswith("peft.") for m in model.modules()):
            raise RuntimeError("this backbone already carries LoRA adapters; build a fresh backbone per lora method")
        frozen_before = {id(p) for p in model.parameters()}
        if self.mode == "qv":
            self._wrap_qv(model)
        else:
            self._inject_peft(model, backbone.name)
        mine = {id(p) for p in self.adapters.parameters()}
        for n, p in model.named_parameters():
            if id(p) in mine:
                p.requires_grad_(True)
            elif p.requires_grad or id(p) not in frozen_before:
                raise RuntimeError(f"a non-adapter parameter became trainable or new: {n}")
        self.head = ClassifierHead(backbone.embed_dim, n_cls, self.head_init_std).to(backbone.device)
        self.adapters.to(backbone.device)

    def _wrap_qv(self, model: nn.Module) -> None:
        for i, blk in enumerate(model.blocks):
            qkv = getattr(getattr(blk, "attn", None), "qkv", None)
            if not isinstance(qkv, nn.Linear):
                raise ValueError(f"lora mode=qv needs timm's fused attn.qkv linear layer in every block; block {i} "
                                 f"has {type(qkv).__name__}; use mode=peft with target_modules")
            wrapped = QVLoRA(qkv, self.r, self.alpha).to(qkv.weight.device)
            blk.attn.qkv = wrapped
            self.adapters[f"blocks__{i}__attn__qkv"] = nn.ModuleDict(
                {"q_A": wrapped.q_A, "q_B": wrapped.q_B, "v_A": wrapped.v_A, "v_B": wrapped.v_B})

    def _inject_peft(self, model: nn.Module, name: str) -> None:
        import prompttune._tvshim  # noqa: F401  (peft imports transformers, which imports torchvision)
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [t for t in self.target_modules if t not in names]
        if unknown:
            raise ValueError(f"lora.target_modules {unknown} match no linear layer of {name}; "
                             f"its linear layers are named: {', '.join(sorted(names))}")
        cfg = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                         target_modules=self.target_modules, bias="none")
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
        for mod_name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and ADAPTER_NAME in mod.lora_A:
                key = mod_name.replace(".", "__")
                self.adapters[key] = nn.ModuleDict({"A": mod.lora_A[ADAPTER_NAME], "B": mod.lora_B[ADAPTER_NAME]})

    def forward(self, backbone: Any, batch: dict[str, Any]) -> dict[str, Any]:
        if self.head is None:
            raise RuntimeError("lora: call setup(backbone, datamodule) before forward")
        return {"logits": self.head(backbone.encode_image(batch["image"]))}

    def param_groups(self, cfg: Any) -> list[dict[str, Any]]:
        return head_param_groups(list(self.adapters.parameters()), self.head, cfg, self.head_weight_decay)
