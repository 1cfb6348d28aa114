"""Coupled (MaPLe-style) deep prompts inside open_clip's two towers.

MaPLe (Khattak et al., CVPR 2023; official ``clip/model.py``, ``ResidualAttentionBlock_MaPLe``
and ``VisionTransformer_MaPLe``) changes CLIP's forward pass in two places:

* text tower: the shallow context replaces the token embeddings right after [SOS]; at each of
  the layers ``1..len(deep_text)`` the ``n_ctx`` states at those positions are *replaced* by
  that layer's learned vectors before the block runs;
* image tower: the shallow visual context is appended after [CLS] + patches (after the
  positional embedding, before ``ln_pre``, so it goes through ``ln_pre`` too); at each layer
  ``1..len(deep_vision)`` the *last* ``n_ctx`` states are replaced.

:class:`CoupledPrompts` holds the learnable part (text vectors per layer and the linear
text -> vision coupling functions, MaPLe's ``proj`` and ``compound_prompt_projections``);
:func:`encode_text` and :func:`encode_image` run a frozen open_clip model with them. The
backbone stays frozen: only the prompts and the coupling layers receive gradients. Shared by
``methods/maple.py`` (MaPLe) and ``methods/dual_prompt.py`` (DCAR's dual prompts).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise TypeError(f"expected an open_clip Transformer with .resblocks, got {type(transformer).__name__}")
    return blocks


def tower_depths(model: nn.Module) -> tuple[int, int]:
    """(text layers, vision layers) of an open_clip CLIP."""
    return len(_blocks(model.transformer)), len(_blocks(model.visual.transformer))


def tower_widths(model: nn.Module) -> tuple[int, int]:
    """(text width, vision width) of an open_clip CLIP."""
    return int(model.token_embedding.weight.shape[1]), int(model.visual.conv1.weight.shape[0])


class CoupledPrompts(nn.Module):
    """MaPLe's multi-modal prompt learner without the class-name pieces.

    ``ctx`` [n_ctx, W_t] (shallow text context) and ``deep_text[i]`` [n_ctx, W_t] for layers
    ``1..depth-1``. Visual side (``visual``):

    * ``"coupled"`` (MaPLe, Eq. 7): ``proj`` (W_t -> W_v) gives the shallow visual context
      ``proj(ctx)``, ``deep_proj[i]`` the deep ones; initialised as the official
      ``MultiModalPromptLearner``: the ``depth - 1`` deep projections are deep copies of *one*
      ``nn.Linear`` (official ``_get_clones``), so they start identical;
    * ``"independent"``: learned visual vectors ~ N(0, 0.02^2), no coupling (an ablation);
    * ``"none"``: text prompts only, no visual parameters.

    Deep text prompts ~ N(0, 0.02^2) (official ``nn.init.normal_(std=0.02)``).
    """

    VISUAL = ("coupled", "independent", "none")

    def __init__(self, ctx: torch.Tensor, vision_width: int, depth: int, visual: str = "coupled"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"prompt depth must be >= 1 (1 = shallow prompts only), got {depth}")
        if visual not in self.VISUAL:
            raise ValueError(f"visual prompts must be one of {self.VISUAL}, not {visual!r}")
        n_ctx, text_width = ctx.shape
        self.n_ctx, self.depth, self.visual = int(n_ctx), int(depth), visual
        self.ctx = nn.Parameter(ctx.clone())
        dev = ctx.device
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, text_width, device=dev) * 0.02) for _ in range(depth - 1)])
        if visual == "coupled":
            self.proj = nn.Linear(text_width, vision_width, device=dev)
            one = nn.Linear(text_width, vision_width, device=dev)
            self.deep_proj = nn.ModuleList([copy.deepcopy(one) for _ in range(depth - 1)])
        elif visual == "independent":
            self.vision_ctx = nn.Parameter(torch.randn(n_ctx, vision_width, device=dev) * 0.02)
            self.deep_vision = nn.ParameterList(
                [nn.Parameter(torch.randn(n_ctx, vision_width, device=dev) * 0.02) for _ in range(depth - 1)])

    def vision(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(shallow visual context [n_ctx, W_v], deep visual prompts per layer)."""
        if self.visual == "coupled":
            return self.proj(self.ctx), [p(t) for p, t in zip(self.deep_proj, self.deep_text)]
        if self.visual == "independent":
            return self.vision_ctx, list(self.deep_vision)
        raise RuntimeError("these prompts have no visual side (visual='none')")

    def text(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.ctx, list(self.deep_text)


def _run_blocks(transformer: nn.Module, x: torch.Tensor, deep: list[torch.Tensor], replace, attn_mask=None):
    """x [N, L, W] through the blocks; before block i (1 <= i <= len(deep)), ``replace(x, deep[i-1])``."""
    blocks = _blocks(transformer)
    if len(deep) > len(blocks) - 1:
        raise ValueError(f"{len(deep) + 1} prompt layers requested but the tower has {len(blocks)} blocks")
    batch_first = getattr(transformer, "batch_first", True)
    for i, blk in enumerate(blocks):
        if 1 <= i <= len(deep):
            x = replace(x, deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1))
        if batch_first:
            x = blk(x, attn_mask=attn_mask)
        else:
            x = blk(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def encode_text(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor, deep: list[torch.Tensor] | None = None,
                start: int = 1) -> torch.Tensor:
    """Text features [N, D] from token embeddings ``x`` [N, L, W] (shallow prompts already in
    place) with deep prompts replacing positions ``start .. start+n_ctx`` at layers 1..len(deep).
    ``tokens`` [N, L] locates the end-of-text token (the largest id), as open_clip's argmax pool."""
    deep = deep or []
    cast = model.transformer.get_cast_dtype()
    x = x.to(cast) + model.positional_embedding.to(cast)

    def replace(h, p):
        return torch.cat([h[:, :start], p, h[:, start + p.shape[1]:]], dim=1)

    x = _run_blocks(model.transformer, x, deep, replace, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_image(model: nn.Module, images: torch.Tensor, ctx: torch.Tensor | None,
                 deep: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Image features [N, D] with the visual context ``ctx`` [n_ctx, W_v] appended after the
    patches (through ``ln_pre``, as MaPLe cats before it) and deep prompts replacing the last
    ``n_ctx`` states at layers 1..len(deep)."""
    visual = model.visual
    if not hasattr(visual, "_embeds") or not hasattr(visual, "_pool"):
        raise TypeError("deep visual prompts need an open_clip VisionTransformer (open_clip >= 2.24: _embeds/_pool)")
    deep = deep or []
    x = visual._embeds(images.to(visual.conv1.weight.dtype))  # [N, 1 + grid^2, W], after ln_pre
    if ctx is not None:
        p = visual.ln_pre(ctx.to(x.dtype)).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x, p], dim=1)
    n = 0 if ctx is None else ctx.shape[0]
    if deep and n == 0:
        raise ValueError("deep visual prompts need shallow ones (MaPLe replaces the last n_ctx tokens)")

    def replace(h, q):
        return torch.cat([h[:, :-n], q], dim=1)

    x = _run_blocks(visual.transformer, x, deep, replace)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled
