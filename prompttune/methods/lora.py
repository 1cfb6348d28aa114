"""LoRA baseline: low-rank adapters on the frozen ViT's linear layers, through peft
(Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, Eq. 3:
``h = W0 x + (alpha / r) · B A x``, A Kaiming-uniform, B zero, so training starts at the
frozen model). The standard PEFT reference point beside VPT / SPT.

How it stays within the framework's contract (the backbone owns the frozen weights, the
method owns only what it trains):

1. ``setup`` calls ``peft.inject_adapter_in_model(LoraConfig(...), backbone.model)``:
   peft wraps each targeted ``nn.Linear`` (timm's fused attention ``qkv`` by default)
   in a ``lora.Linear`` whose ``base_layer`` is the original, still frozen, layer, and
   adds the new ``lora_A`` / ``lora_B`` sub-layers -- the only new parameters.
2. Those sub-layers are registered *also* as submodules of this method
   (``self.adapters``: one ``ModuleDict(A=..., B=...)`` per wrapped layer). They are the
   same ``nn.Linear`` objects, so the optimiser (built over ``method.parameters()``), the
   module's "only the method trains" check, and the trainable-only checkpoints
   (``method.*`` keys) all see exactly the adapters and the head. Nothing of the base
   model is copied or unfrozen; the check below asserts the base weights stay frozen.
3. ``forward`` is the backbone's ordinary ``encode_image`` (pooling as the pretraining
   dictates) followed by the linear head; the adapters act inside the blocks.

Departures / notes:

* The backbone stays in eval mode (framework contract), so ``lora_dropout`` is inactive
  during training; the default is 0.
* The injected layers live inside the run's backbone object: one backbone serves one
  LoRA method (a second ``setup`` on the same backbone is rejected with a clear error).
* ``total_params`` of a run counts the adapters twice (once in the backbone, once in the
  method); ``trainable_params`` is exact.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prompttune.backbones.vit import ViTBackbone
from prompttune.methods._vit_prompts import ClassifierHead, check_vit, head_param_groups, num_classes_of
from prompttune.methods.base import Method
from prompttune.registry import METHODS

ADAPTER_NAME = "prompttune"


@METHODS.register("lora")
class LoRA(Method):
    task = "classification"
    backbone_kind = ViTBackbone
    consumes = "images"

    def __init__(self, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 target_modules: list[str] | tuple[str, ...] = ("qkv",), head_weight_decay: float | None = None):
        super().__init__()
        if int(r) < 1:
            raise ValueError(f"lora.r must be >= 1, got {r}")
        if not target_modules:
            raise ValueError("lora.target_modules must name at least one layer, e.g. [qkv]")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.target_modules = [str(t) for t in target_modules]
        self.head_weight_decay = head_weight_decay
        self.adapters = nn.ModuleDict()
        self.head: ClassifierHead | None = None

    def setup(self, backbone: Any, datamodule: Any) -> None:
        import prompttune._tvshim  # noqa: F401  (peft imports transformers, which imports torchvision)
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        backbone = check_vit(backbone, "lora")
        n_cls = num_classes_of(datamodule, "lora")
        model = backbone.model
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            raise RuntimeError("this backbone already carries LoRA adapters; build a fresh backbone per lora method")
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [t for t in self.target_modules if t not in names]
        if unknown:
            raise ValueError(f"lora.target_modules {unknown} match no linear layer of {backbone.name}; "
                             f"its linear layers are named: {', '.join(sorted(names))}")
        cfg = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                         target_modules=self.target_modules, bias="none")
        frozen_before = {id(p) for p in model.parameters()}
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and ADAPTER_NAME in mod.lora_A:
                key = name.replace(".", "__")
                self.adapters[key] = nn.ModuleDict({"A": mod.lora_A[ADAPTER_NAME], "B": mod.lora_B[ADAPTER_NAME]})
        mine = {id(p) for p in self.adapters.parameters()}
        for n, p in model.named_parameters():
            if id(p) in mine:
                p.requires_grad_(True)
            elif p.requires_grad or id(p) not in frozen_before:
                raise RuntimeError(f"peft left a non-adapter parameter trainable or new: {n}")
        self.head = ClassifierHead(backbone.embed_dim, n_cls).to(backbone.device)
        self.adapters.to(backbone.device)

    def forward(self, backbone: Any, batch: dict[str, Any]) -> dict[str, Any]:
        if self.head is None:
            raise RuntimeError("lora: call setup(backbone, datamodule) before forward")
        return {"logits": self.head(backbone.encode_image(batch["image"]))}

    def param_groups(self, cfg: Any) -> list[dict[str, Any]]:
        return head_param_groups(list(self.adapters.parameters()), self.head, cfg, self.head_weight_decay)
