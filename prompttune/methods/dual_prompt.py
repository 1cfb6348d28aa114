"""DCAR: Dual prompt learning with joint Category-Attribute Reweighting, over frozen CLIP.

Paper: "Dual Prompt Learning for Adapting Vision-Language Models to Downstream Image-Text
Retrieval" (arXiv 2508.04028). Repository wyf202322/DCAR: README, Fig. 2 (``figure/fig2.png``)
and the FDRD data; no method code, and the paper's method section could not be read from
here, so the equations below are Fig. 2's and every other detail is a named guess (G1-G12).

Fig. 2, part by part, and what implements it:

1. **Dual prompt learning** ("Text Prompt v1..vk + w_token · caption", "Image Prompt
   e1..ek + image", "Semantic Analysis Guide Generation" from v_i to e_i): learnable text
   context before the caption, and visual prompts generated from it by a linear map, as
   MaPLe couples them (``_clip_deep_prompts.CoupledPrompts``; ``visual_prompt``:
   ``coupled`` | ``independent`` | ``none``). G1: the guide is MaPLe's linear coupling
   (DCAR's INSTALL.md is MaPLe's, and MaPLe is its strongest baseline). G2: the prompts are
   deep, MaPLe's ``prompt_depth`` layers (the figure draws the input layer only; 1 = shallow).
   G3: n_ctx = 2 and "a photo of a" initialisation, MaPLe's.
2. **Dynamic token re-weighting** (``token_reweight``): for caption word j and its image I,
   ``w_j = |S(token_j, I'_blank) - S(token_j, I')|`` (Fig. 2). G4: S is the cosine between the
   frozen CLIP text feature of the token alone ("[SOT] token [EOT]") and the *prompted* image
   feature (I' = the image with its image prompt, which is what makes the weights dynamic),
   computed without gradient at every training step; I'_blank is a blank image (``blank``:
   ``mean`` = the normalisation mean, i.e. zeros after normalising; ``white``; ``black``).
   G5: the |ΔS| are divided by their mean over the caption's words (so a caption keeps its
   scale) and blended, ``w' = max(0, 1 + reweight_strength * (w - 1))``; they scale the caption
   token embeddings (``w_token · caption``), not the prompts, [SOT] or [EOT]. G6: at
   evaluation the paired image is unknown (a text query has no image), so each vocabulary
   token gets the running mean (``reweight_momentum``) of its training weights
   (``eval_reweight: running``), or no weights (``none``).
3. **Category-aware augmentation** ("Negative Caption Generator"): for each training pair,
   ``swap_negatives`` captions with the class name swapped (every occurrence,
   ``data.fdrd.swap_class``) and ``attr_negatives`` captions of the *same* category with one
   attribute word altered (Fig. 2's "stands on the bed with black and white"). G7: swapped
   classes are drawn from the ``neg_pool`` classes nearest by frozen CLIP text similarity of
   "a photo of a {class}."; G8: attribute alteration is rule-based, one whole word replaced
   by another of its family (``attribute_words``: colours, sizes, positions by default; the
   paper's generator is presumably a language model).
4. **Category-match weight** (``category_weighting``, ``alpha``): ``w = 1 + alpha`` when the
   negative's category is the image's (the attribute-altered ones), else 1 (Fig. 2). G9: w
   multiplies the negative's term in L_cate's softmax denominator (``+log w`` on its logit).
5. **Losses** L_con + L_cate (``cate_loss``, ``cate_weight``): L_con is the retrieval task's
   symmetric InfoNCE over the batch; L_cate the cross-entropy of each image over
   [its positive, its negatives] with the weights above. G10: equal weights (1).
6. **CAA** (``caa``): a trainable block between the text encoder and L_cate (Fig. 2: both the
   positive and the negatives pass through it; L_con does not). G11: a residual bottleneck
   adapter on the text embedding, ``t + up(relu(down(t)))``, ``up`` zero-initialised (identity
   at the start), reduction ``caa_reduction``. G12: used in L_cate only; ``caa_at_test`` also
   applies it to evaluation text features.

The text-only variant (both prompts in the text, cached image features) is ``dual_prompt_text``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones.clip import CLIPBackbone
from prompttune.config import ConfigError
from prompttune.data.fdrd import swap_class
from prompttune.methods import _clip_deep_prompts as deep
from prompttune.methods.base import Method
from prompttune.methods.maple import check_depth, init_context
from prompttune.registry import METHODS

# G8: attribute families whose words replace each other in attribute-altered negatives
DEFAULT_ATTRIBUTE_WORDS = (
    ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "cyan",
     "golden", "silver"),
    ("small", "large"),
    ("left", "right"),
    ("standing", "sitting", "lying", "flying"),
)
BLANKS = ("mean", "white", "black")


class CategoryAwareAdapter(nn.Module):
    """G11: residual bottleneck adapter on text embeddings; identity at initialisation."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))


@METHODS.register("dual_prompt")
class DualPrompt(Method):
    task = "retrieval"
    backbone_kind = CLIPBackbone
    consumes = "images"

    def __init__(self, n_ctx: int = 2, ctx_init: str | None = "a photo of a", prompt_depth: int = 9,
                 init_std: float = 0.02, visual_prompt: str = "coupled",
                 token_reweight: bool = True, reweight_strength: float = 0.5, reweight_momentum: float = 0.9,
                 blank: str = "mean", eval_reweight: str = "running",
                 cate_loss: bool = True, cate_weight: float = 1.0, swap_negatives: int = 2, attr_negatives: int = 2,
                 neg_pool: int = 3, attribute_words: list[list[str]] | None = None,
                 category_weighting: bool = True, alpha: float = 0.5,
                 caa: bool = True, caa_reduction: int = 4, caa_at_test: bool = False):
        super().__init__()
        self.n_ctx, self.ctx_init, self.depth, self.init_std = int(n_ctx), ctx_init or None, int(prompt_depth), init_std
        self.visual_prompt = visual_prompt
        # without visual prompts the image tower is the frozen one: its features are cached
        self.consumes = "images" if visual_prompt != "none" else "image_features"
        self.token_reweight, self.reweight_strength = bool(token_reweight), float(reweight_strength)
        self.reweight_momentum, self.blank, self.eval_reweight = float(reweight_momentum), blank, eval_reweight
        self.cate_loss, self.cate_weight = bool(cate_loss), float(cate_weight)
        self.swap_negatives, self.attr_negatives, self.neg_pool = int(swap_negatives), int(attr_negatives), int(neg_pool)
        self.attribute_words = [list(f) for f in (attribute_words or DEFAULT_ATTRIBUTE_WORDS)]
        self.category_weighting, self.alpha = bool(category_weighting), float(alpha)
        self.use_caa, self.caa_reduction, self.caa_at_test = bool(caa), int(caa_reduction), bool(caa_at_test)
        self.prompts: deep.CoupledPrompts | None = None
        self.caa: CategoryAwareAdapter | None = None
        self.classnames: list[str] = []
        self._gen = torch.Generator().manual_seed(0)
        self._token_feats: dict[int, torch.Tensor] = {}
        self._attr_res = [re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, f)) + r")(?![\w-])", re.IGNORECASE)
                          for f in self.attribute_words if len(f) > 1]

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        m = cfg.method

        def bad(key, why):
            raise ConfigError(f"method.{key}={m.get(key)!r}: {why}")

        if m.get("visual_prompt", "coupled") not in deep.CoupledPrompts.VISUAL:
            bad("visual_prompt", f"expected one of {', '.join(deep.CoupledPrompts.VISUAL)}")
        if m.get("blank", "mean") not in BLANKS:
            bad("blank", f"expected one of {', '.join(BLANKS)}")
        if m.get("eval_reweight", "running") not in ("running", "none"):
            bad("eval_reweight", "expected running or none")
        if int(m.get("n_ctx", 2)) < 1:
            bad("n_ctx", "expected >= 1")
        if int(m.get("prompt_depth", 9)) < 1:
            bad("prompt_depth", "expected >= 1 (1 = shallow prompts)")
        if not 0.0 <= float(m.get("reweight_strength", 0.5)) <= 1.0:
            bad("reweight_strength", "expected a number in [0, 1]")
        if not 0.0 <= float(m.get("reweight_momentum", 0.9)) < 1.0:
            bad("reweight_momentum", "expected a number in [0, 1)")
        if float(m.get("alpha", 0.5)) < 0:
            bad("alpha", "expected >= 0 (the weight is 1 + alpha)")
        for key in ("swap_negatives", "attr_negatives", "neg_pool"):
            if int(m.get(key, 0)) < 0:
                bad(key, "expected >= 0")
        if int(m.get("caa_reduction", 4)) < 1:
            bad("caa_reduction", "expected >= 1")
        if m.get("cate_loss", True) and int(m.get("swap_negatives", 2)) + int(m.get("attr_negatives", 2)) == 0:
            bad("cate_loss", "L_cate needs negatives: set swap_negatives or attr_negatives > 0, or cate_loss=false")
        if m.get("cate_loss", True) is False:
            for key in ("caa", "category_weighting"):
                if m.get(key, True):
                    bad(key, "has no effect without L_cate (cate_loss=false): set it to false too")

    # ------------------------------------------------------------------ setup
    def setup(self, backbone: CLIPBackbone, datamodule: Any) -> None:
        if not isinstance(backbone, CLIPBackbone):
            raise TypeError(f"dual_prompt needs a CLIP backbone (backbone.name=clip), got {type(backbone).__name__}")
        check_depth(backbone, self.depth)
        ctx, self.prefix_text = init_context(backbone, self.n_ctx, self.ctx_init, self.init_std)
        self.n_prefix = int((backbone.tokenize([self.prefix_text])[0] > 0).sum()) - 2
        self.prompts = deep.CoupledPrompts(ctx, deep.tower_widths(backbone.model)[1], self.depth, self.visual_prompt)
        self.classnames = list(datamodule.info().get("classnames") or [])
        self._gen.manual_seed(int(getattr(datamodule, "seed", 0)))
        if self.cate_loss and self.swap_negatives and len(self.classnames) < 2:
            raise ValueError("dual_prompt: category-swapped negatives need at least two classes in the data "
                             "(set swap_negatives=0 or use data with classnames)")
        if self.cate_loss and self.use_caa:
            self.caa = CategoryAwareAdapter(backbone.embed_dim, self.caa_reduction).to(backbone.device)
        if self.cate_loss and self.swap_negatives:
            with torch.no_grad():
                t = backbone.encode_text(backbone.tokenize([f"a photo of a {n}." for n in self.classnames])).float()
                t = F.normalize(t, dim=-1)
                sim = (t @ t.T).fill_diagonal_(float("-inf"))
                k = min(self.neg_pool or len(self.classnames) - 1, len(self.classnames) - 1)
                self.register_buffer("neg_pool_idx", sim.topk(k, dim=1).indices, persistent=False)
        vocab = backbone.model.token_embedding.weight.shape[0]
        # running token weights for evaluation (G6): learned state, saved in checkpoints
        self.register_buffer("token_weight_table", torch.ones(vocab, device=backbone.device))
        self.register_buffer("token_weight_seen", torch.zeros(vocab, dtype=torch.bool, device=backbone.device))
        self._blank_feature = None  # frozen-tower blank feature (visual_prompt=none), filled on first use

    # ------------------------------------------------------------------ text side
    def _tokens(self, backbone, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [N, L] of "<ctx_init> caption" and the caption-word mask [N, L]."""
        tokens = backbone.tokenize([f"{self.prefix_text} {c}" for c in captions])
        eot = tokens.argmax(dim=-1, keepdim=True)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        words = (pos >= 1 + self.n_prefix) & (pos < eot)
        return tokens, words

    def encode_text(self, backbone, tokens, weights: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).float()
        if weights is not None:
            emb = emb * weights[..., None]
        ctx, deep_text = self.prompts.text()
        x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(tokens), -1, -1), emb[:, 1 + self.n_ctx:]], dim=1)
        return F.normalize(deep.encode_text(backbone.model, x, tokens, deep_text).float(), dim=-1)

    def encode_image(self, backbone, batch_or_images) -> torch.Tensor:
        if self.visual_prompt == "none":
            return F.normalize(batch_or_images.float(), dim=-1)
        vctx, deep_vision = self.prompts.vision()
        return F.normalize(deep.encode_image(backbone.model, batch_or_images, vctx, deep_vision).float(), dim=-1)

    # ------------------------------------------------------------------ token weights (Fig. 2, left)
    @torch.no_grad()
    def _single_token_features(self, backbone, ids: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP text features of each token id alone, "[SOT] id [EOT]" (G4; cached per id)."""
        todo = sorted({int(i) for i in ids.unique().tolist()} - set(self._token_feats))
        if todo:
            probe = backbone.tokenize([""])[0]
            sot, eot = int(probe[0]), int(probe[1])
            t = torch.zeros(len(todo), probe.shape[0], dtype=torch.long, device=ids.device)
            t[:, 0], t[:, 1], t[:, 2] = sot, torch.tensor(todo, device=ids.device), eot
            feats = F.normalize(backbone.encode_text(t).float(), dim=-1)
            self._token_feats.update({i: f for i, f in zip(todo, feats)})
        return torch.stack([self._token_feats[int(i)] for i in ids.tolist()]) if len(ids) else \
            torch.zeros(0, backbone.embed_dim, device=ids.device)

    @torch.no_grad()
    def _blank_images(self, backbone, like: torch.Tensor) -> torch.Tensor:
        if self.blank == "mean":
            return torch.zeros_like(like[:1])
        mean = torch.tensor(backbone.mean, device=like.device).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std, device=like.device).view(1, 3, 1, 1)
        value = 1.0 if self.blank == "white" else 0.0
        return ((torch.full_like(like[:1], value) - mean) / std).to(like.dtype)

    @torch.no_grad()
    def dynamic_weights(self, backbone, tokens, words, img_feats: torch.Tensor, blank_feat: torch.Tensor) -> torch.Tensor:
        """w_j = |S(token_j, I'_blank) - S(token_j, I')| per caption word (Fig. 2), normalised (G5)."""
        rows, cols = torch.nonzero(words, as_tuple=True)
        w = torch.ones(tokens.shape, device=tokens.device)
        if rows.numel() == 0:
            return w
        ids = tokens[rows, cols]
        t = self._single_token_features(backbone, ids)
        raw = ((t * blank_feat).sum(-1) - (t * img_feats[rows]).sum(-1)).abs()
        total = torch.zeros(tokens.shape[0], device=w.device).index_add_(0, rows, raw)
        count = words.sum(1).clamp(min=1).float()
        norm = raw / (total / count)[rows].clamp(min=1e-8)
        w[rows, cols] = norm
        # running per-token weights for evaluation (G6)
        m = self.reweight_momentum
        uniq, inv = torch.unique(ids, return_inverse=True)
        mean = torch.zeros(len(uniq), device=w.device).index_add_(0, inv, norm) / torch.bincount(inv).float()
        seen = self.token_weight_seen[uniq]
        old = self.token_weight_table[uniq]
        self.token_weight_table[uniq] = torch.where(seen, m * old + (1 - m) * mean, mean)
        self.token_weight_seen[uniq] = True
        return self._blend(w, words)

    def _blend(self, w: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        blended = (1.0 + self.reweight_strength * (w - 1.0)).clamp(min=0.0)
        return torch.where(words, blended, torch.ones_like(w))

    def eval_weights(self, tokens, words) -> torch.Tensor | None:
        if not self.token_reweight or self.eval_reweight == "none" or not bool(self.token_weight_seen.any()):
            return None
        return self._blend(self.token_weight_table[tokens], words & self.token_weight_seen[tokens])

    # ------------------------------------------------------------------ negatives (Fig. 2, right)
    def _alter_attribute(self, caption: str) -> str | None:
        """The caption with one attribute word replaced by another of its family (G8), or None."""
        spots = [(rx, m) for rx in self._attr_res for m in rx.finditer(caption)]
        if not spots:
            return None
        rx, m = spots[int(torch.randint(len(spots), (1,), generator=self._gen))]
        family = next(f for f in self.attribute_words if m.group(1).lower() in (w.lower() for w in f))
        choices = [w for w in family if w.lower() != m.group(1).lower()]
        new = choices[int(torch.randint(len(choices), (1,), generator=self._gen))]
        if m.group(1)[:1].isupper():
            new = new[:1].upper() + new[1:]
        return caption[:m.start(1)] + new + caption[m.end(1):]

    def make_negatives(self, captions: list[str], labels: list[int]) -> tuple[list[str], torch.Tensor]:
        """Negatives [B*M] (swapped first, then attribute-altered) and their log-weights [B, M]
        (``log(1 + alpha)`` for same-category negatives under category weighting, 0 otherwise,
        ``-inf`` for a slot that could not be filled)."""
        ms, ma = self.swap_negatives, self.attr_negatives
        negs, logw = [], torch.zeros(len(captions), ms + ma)
        same = float(torch.log1p(torch.tensor(self.alpha))) if self.category_weighting else 0.0
        for b, (cap, lab) in enumerate(zip(captions, labels)):
            if ms:
                cands = self.neg_pool_idx[lab].cpu() if 0 <= lab < len(self.classnames) else torch.zeros(0, dtype=torch.long)
                order = cands[torch.randperm(len(cands), generator=self._gen)]
                for j in range(ms):
                    new = None
                    if len(order):
                        c = int(order[j % len(order)])
                        new = swap_class(cap, self.classnames[lab], self.classnames[c])
                    negs.append(new if new is not None else cap)
                    logw[b, j] = 0.0 if new is not None else float("-inf")  # swapped class: w = 1
            for j in range(ma):
                new = self._alter_attribute(cap)
                negs.append(new if new is not None else cap)
                logw[b, ms + j] = same if new is not None else float("-inf")
        return negs, logw

    # ------------------------------------------------------------------ forward
    def forward(self, backbone, batch: dict[str, Any]) -> dict[str, Any]:
        images = batch["features"] if self.visual_prompt == "none" else batch["image"]
        img = self.encode_image(backbone, images)
        captions = list(batch["caption"])
        tokens, words = self._tokens(backbone, captions)
        scale = backbone.logit_scale.float()
        if self.training and self.token_reweight:
            blank = self._blank_feature_of(backbone, images)
            weights = self.dynamic_weights(backbone, tokens, words, img.detach(), blank)
        else:
            weights = self.eval_weights(tokens, words)
        txt = self.encode_text(backbone, tokens, weights)
        out = {"image_features": img, "text_features": txt, "logit_scale": scale}
        b = len(captions)
        if self.training and self.cate_loss:
            labels = [int(x) for x in batch["label"]] if "label" in batch else [-1] * b
            negs, logw = self.make_negatives(captions, labels)
            n_tokens, n_words = self._tokens(backbone, negs)
            # G5: a negative keeps the weights of its own words from the running table
            neg = self.encode_text(backbone, n_tokens, self.eval_weights(n_tokens, n_words)).view(b, -1, txt.shape[-1])
            pos = txt
            if self.caa is not None:
                pos, neg = F.normalize(self.caa(pos), dim=-1), F.normalize(self.caa(neg), dim=-1)
            logits = torch.cat([(img * pos).sum(-1, keepdim=True), torch.einsum("bd,bmd->bm", img, neg)], 1) * scale
            logits = logits + torch.cat([logw.new_zeros(b, 1), logw], 1).to(logits.device)  # +log w (G9)
            l_cate = -logits.log_softmax(1)[:, 0].mean()
            out["aux_loss"] = self.cate_weight * l_cate
            out["l_cate"] = l_cate.detach()
        elif not self.training:
            negs = batch.get("negatives")
            if negs and len(negs[0]):
                flat = [n for row in negs for n in row]
                n_tokens, n_words = self._tokens(backbone, flat)
                out["neg_text_features"] = self._maybe_caa(
                    self.encode_text(backbone, n_tokens, self.eval_weights(n_tokens, n_words))).view(b, len(negs[0]), -1)
            out["text_features"] = self._maybe_caa(txt)
        return out

    def _maybe_caa(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.caa(t), dim=-1) if (self.caa is not None and self.caa_at_test) else t

    @torch.no_grad()
    def _blank_feature_of(self, backbone, images: torch.Tensor) -> torch.Tensor:
        """The (prompted) image feature of the blank image, with the current prompts."""
        if self.visual_prompt == "none":
            if getattr(self, "_blank_feature", None) is None:
                size = backbone.image_size
                px = torch.zeros(1, 3, size, size, device=images.device)
                self._blank_feature = F.normalize(backbone.encode_image(self._blank_images(backbone, px)).float(), dim=-1)
            return self._blank_feature[0]
        return self.encode_image(backbone, self._blank_images(backbone, images))[0]

