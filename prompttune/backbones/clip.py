"""Frozen CLIP through open_clip, with the hooks text-prompt methods need.

Weights, in order of precedence: a zoo entry (``zoo: clip-tiny``, built offline on the
synthetic world), a local checkpoint file (``checkpoint: path``; open_clip or OpenAI
state-dict keys, loaded weights-only, or OpenAI's released TorchScript archive), or an
open_clip model name with a pretrained tag (``model: ViT-B-32, pretrained: laion2b_s34b_b79k``:
downloads, for users online).

**Activation.** OpenAI's CLIP weights were trained with QuickGELU (``x * sigmoid(1.702 x)``);
open_clip's plain ``ViT-B-32`` / ``ViT-B-16`` configs build ``nn.GELU`` and only warn when
OpenAI weights are loaded into them (and the ``checkpoint:`` route does not warn at all), which
shifts every feature. ``quick_gelu: null`` (auto) builds the activation the weights were
trained with: QuickGELU when the model name says so (``ViT-B-32-quickgelu``), when the
``pretrained`` tag's open_clip metadata says so (``openai`` and the other QuickGELU tags; on
the checkpoint route ``pretrained`` names the file's provenance), or when the checkpoint is
OpenAI's TorchScript release; GELU otherwise (laion/datacomp tags). ``true``/``false`` forces it.
The built activation is recorded in the backbone's name (``+quickgelu``).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prompttune import zoo
from prompttune.backbones.base import FrozenBackbone
from prompttune.registry import BACKBONES
from prompttune.utils import torch_load_trusted

# keys of OpenAI's TorchScript state dict that are not parameters (open_clip drops them too)
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript_archive(path: str | Path) -> bool:
    """OpenAI's released ``ViT-B-32.pt`` files are TorchScript archives (a zip with ``code/``)."""
    path = Path(path)
    if path.suffix == ".safetensors" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name or name.startswith("code/") for name in zf.namelist())


def wants_quick_gelu(model: str, pretrained: str | None, quick_gelu: bool | None = None,
                     torchscript: bool = False) -> bool:
    """Whether the weights of (model, pretrained tag) were trained with QuickGELU (see module doc)."""
    import open_clip

    model_cfg = open_clip.get_model_config(model) or {}
    in_name = bool(model_cfg.get("quick_gelu", False))
    tag_cfg = (open_clip.get_pretrained_cfg(model, pretrained) or {}) if pretrained else {}
    if quick_gelu is not None:
        if in_name and not quick_gelu:
            raise ValueError(f"backbone.quick_gelu=false, but open_clip model {model!r} is built with QuickGELU; "
                             f"choose the GELU model name (e.g. {model.replace('-quickgelu', '')!r})")
        if tag_cfg and bool(tag_cfg.get("quick_gelu", False)) != bool(quick_gelu):
            warnings.warn(f"backbone.quick_gelu={quick_gelu} overrides the activation that the {pretrained!r} "
                          f"weights of {model} were trained with (quick_gelu={bool(tag_cfg.get('quick_gelu'))})",
                          stacklevel=3)
        return bool(quick_gelu)
    return in_name or bool(tag_cfg.get("quick_gelu", False)) or torchscript


def load_clip_state(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A CLIP state dict from a file, and whether it is OpenAI's TorchScript release.

    State dicts (``.pt``/``.bin``/``.safetensors``, optionally under ``state_dict`` and with
    DDP's ``module.`` prefix) load weights-only; TorchScript archives through ``torch.jit.load``
    (which deserialises TorchScript, not pickled Python objects).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_torchscript_archive(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        # a traced archive may carry the causal mask, a non-persistent buffer in open_clip
        return {k: v for k, v in state.items() if k not in _OPENAI_META_KEYS + ("attn_mask",)}, True
    state = torch_load_trusted(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in _OPENAI_META_KEYS}, False


def activation_of(model: nn.Module) -> str:
    """``quick_gelu`` or ``gelu``: the activation the built transformer blocks actually use."""
    from open_clip.transformer import QuickGELU

    acts = {type(m) for m in model.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    if acts == {QuickGELU}:
        return "quick_gelu"
    if acts == {nn.GELU}:
        return "gelu"
    return "+".join(sorted(a.__name__ for a in acts)) or "none"


@BACKBONES.register("clip")
class CLIPBackbone(FrozenBackbone):
    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, checkpoint: str | None = None,
                 zoo_entry: str | None = None, weights: str = "pretrained", quick_gelu: bool | None = None,
                 **_: Any):
        super().__init__()
        import open_clip

        self.weights = weights  # pretrained | random: models built beside this one (TVP's TSE CLIP) follow it
        if zoo_entry:
            self.model = zoo.load_model(zoo_entry, weights)
            self.name = f"zoo:{zoo_entry}" + ("" if weights == "pretrained" else f"({weights})")
            ctx = self.model.context_length
            self._tokenizer = open_clip.SimpleTokenizer(context_length=ctx)
        else:
            from prompttune.zoo.clip_tiny import register_tiny_config

            register_tiny_config()  # the zoo architecture is an open_clip name too
            if checkpoint:
                state, torchscript = load_clip_state(checkpoint)
                qg = wants_quick_gelu(model, pretrained, quick_gelu, torchscript)
                self.model = open_clip.create_model(model, pretrained=None, force_quick_gelu=qg)
                self.model.load_state_dict(state, strict=True)
                self.name = f"{model}:{Path(checkpoint).name}"
            else:
                tag = None if weights == "random" else pretrained
                # the activation follows the configured tag even for random weights: the
                # architecture is the one those weights need
                qg = wants_quick_gelu(model, pretrained, quick_gelu)
                with warnings.catch_warnings():
                    # open_clip's mismatch warning cannot fire any more: the activation matches the tag
                    warnings.filterwarnings("ignore", message="QuickGELU mismatch")
                    self.model = open_clip.create_model(model, pretrained=tag, force_quick_gelu=qg)
                self.name = f"{model}:{tag or 'random'}"
            self._tokenizer = open_clip.get_tokenizer(model)
        self.activation = activation_of(self.model)
        if self.activation == "quick_gelu" and "quickgelu" not in self.name:
            self.name += "+quickgelu"
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(visual, "image_mean", None) or self.mean)
        self.std = tuple(getattr(visual, "image_std", None) or self.std)
        self.freeze()

    # -- text side ---------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts).to(self.device)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def encode_text_embeddings(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text`` from token embeddings [N, L, W]: what CoOp needs.

        ``tokens`` [N, L] only locates the end-of-text token (the pooled position), so
        prompts whose context replaces placeholder tokens keep the real EOT position.
        """
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = x.to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    # -- image side --------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()
