"""The baselines of MMICT's comparison (arXiv 2312.06363, Tables 2-4), on the same frozen BLIP-2.

* ``ft_qformer`` -- vanilla fine-tuning: the *same trainable parts* as the M-Hub (a copy of
  the Q-Former with its text path, the query tokens and the projection), the instruction fed
  to the Q-Former as InstructBLIP does, and **no demonstrations** (k = 0 only).
* ``vanilla_ict`` -- vanilla in-context tuning: demonstrations enter the LM as *raw features*,
  i.e. each demonstration is its plain BLIP-2 visual tokens (Q-Former queries only, no text)
  followed by the LM's embeddings of its text, then EOC; the query is its visual tokens +
  BOS + instruction. Trainable: the same Q-Former / query tokens / projection copy.
* ``lora_lm`` -- LoRA on the language model's attention projections (``q``, ``v``), with
  the backbone's own Q-Former frozen; demonstrations (k >= 0) in the vanilla ICT format.

LoRA follows peft's definition (``LoraConfig(r, lora_alpha, lora_dropout, target_modules)``:
A kaiming-uniform(a=sqrt(5)), B zero, ``y = W x + (alpha / r) B A dropout(x)``). Departure: the
adapters are held by this method and applied with forward hooks that exist only during the
method's forward, instead of peft's ``inject_adapter_in_model``, which would wrap the frozen
backbone's layers in place (the backbone must stay untouched and checkpoints hold only the
adapters). :meth:`LoRALM.peft_state_dict` exports the weights under peft's key names.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from prompttune.backbones.blip2 import Blip2Backbone, run_qformer
from prompttune.methods.mhub import InContextBLIP2, MHub, _HubCopy
from prompttune.registry import METHODS


@METHODS.register("ft_qformer")
class FineTuneQFormer(MHub):
    """MHub's trainable parts and query path without demonstrations (k must be 0)."""

    uses_demonstrations = False

    def __init__(self, k: int = 0, **kw: Any):
        super().__init__(k=k, **kw)


class _RawFeatureDemos(InContextBLIP2):
    """Vanilla ICT format (official ``instruct_qformer: False`` branch of ``blip2_t5.py``: every
    segment is its query outputs + the LM's embeddings of its text):
    [vis_d BOS text_d EOC]*k vis_q BOS prompt_q (no BOS for Flan-T5, whose texts end in ``</s>``)."""

    def visual(self, backbone: Blip2Backbone, image_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build_prefix(self, backbone, batch):
        img, pooled = self.vision_tokens(backbone, batch["image"])
        b = img.shape[0]
        vis = self.visual(backbone, img)
        tails = self.query_tail(backbone, batch["prompt"])
        segs: list[list[torch.Tensor]] = [[] for _ in range(b)]
        if self.k:
            flat = [j for row in self.select(batch, pooled) for j in row]
            d_img, _ = self.vision_tokens(backbone, self.demo_images(flat, img.device))
            dvis = self.visual(backbone, d_img)
            dtails = self.query_tail(backbone, [self.demo_text(self._pool_rows[j]) for j in flat])
            eoc = self.eoc.to(dvis.dtype)[None]
            for i in range(b):
                for j in range(self.k):
                    r = i * self.k + j
                    segs[i] += [dvis[r], dtails[r].to(dvis.dtype), eoc]
        for i in range(b):
            segs[i] += [vis[i], tails[i].to(vis.dtype)]
        return self.assemble(segs)


@METHODS.register("vanilla_ict")
class VanillaICT(_HubCopy, _RawFeatureDemos):
    with_text = False

    def visual(self, backbone, image_embeds):
        return self.proj(run_qformer(self.hub, self.query_tokens, image_embeds))


class LoRAAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype) * self.scaling


@METHODS.register("lora_lm")
class LoRALM(_RawFeatureDemos):
    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
                 target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj", "q", "v"), **kw: Any):
        super().__init__(**kw)
        if self.demo_padding:
            raise ValueError("lora_lm: demo_padding applies to Q-Former text features; lora_lm has none")
        if self.train_ln_vision:
            raise ValueError("lora_lm trains only the LM's adapters; method.train_ln_vision must be false")
        if int(r) < 1:
            raise ValueError(f"method.r (LoRA rank) must be >= 1, got {r}")
        self.r, self.alpha, self.dropout_p, self.target_modules = int(r), float(alpha), float(dropout), tuple(target_modules)
        self.adapters = nn.ModuleDict()
        self._targets: dict[str, str] = {}

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        from prompttune.config import ConfigError

        if int(cfg.method.get("r", 1)) < 1:
            raise ConfigError(f"method.r={cfg.method.r!r}: expected a LoRA rank >= 1")

    def build_trainable(self, backbone: Blip2Backbone) -> None:
        for name, mod in backbone.language_model.named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in self.target_modules:
                key = name.replace(".", "__")
                self.adapters[key] = LoRAAdapter(mod.in_features, mod.out_features, self.r, self.alpha, self.dropout_p)
                self._targets[key] = name
        if not self.adapters:
            raise ValueError(f"lora_lm: no nn.Linear named {list(self.target_modules)} in the language model")

    def visual(self, backbone, image_embeds):
        with torch.no_grad():  # the backbone's own frozen Q-Former: nothing upstream of the LM trains
            return backbone.language_projection(run_qformer(backbone.qformer, backbone.query_tokens, image_embeds))

    @contextlib.contextmanager
    def lm_context(self, backbone: Blip2Backbone):
        modules = dict(backbone.language_model.named_modules())
        handles = []
        for key, name in self._targets.items():
            adapter = self.adapters[key]
            handles.append(modules[name].register_forward_hook(
                lambda mod, inp, out, a=adapter: out + a.delta(inp[0])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters under peft's key names (``base_model.model.<module>.lora_A.weight``)."""
        out = {}
        for key, name in self._targets.items():
            a = self.adapters[key]
            out[f"base_model.model.{name}.lora_A.weight"] = a.lora_A.detach().cpu()
            out[f"base_model.model.{name}.lora_B.weight"] = a.lora_B.detach().cpu()
        return out
