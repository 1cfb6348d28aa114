"""DCAR, text-only variant (``dual_prompt_text``): our first reading of DCAR, kept as a named ablation.

The published design is ``methods/dual_prompt.py`` (``dual_prompt``): a text prompt plus a
visual prompt generated from it, token weights ``|S(token, blank image) - S(token, image)|``,
attribute-altered and category-swapped negatives with a binary category-match weight, L_con
+ L_cate and the CAA block (DCAR's Fig. 2). This variant departs from it on purpose: both
prompts are on the text side, so the frozen image features can be cached and training only
runs the text encoder (the cheapest DCAR-like method); the token weights come from an
occlusion MI estimate; negatives are category swaps only, weighted continuously.

Paper: "Dual Prompt Learning for Adapting Vision-Language Models to Downstream Image-Text
Retrieval" (arXiv 2508.04028; repo wyf202322/DCAR: README, Fig. 2 and the FDRD data, no code).

What each part implements (captions are the text side of every image-text pair):

1. **Attribute-level prompt** (``n_attr_ctx`` vectors, ``attr_init``, ``attr_position``):
   learned context added to every caption, after it (``end``, the default:
   ``[SOT] caption P_a [EOT]``) or before it (``front``, CoOp-style: ``[SOT] P_a caption [EOT]``).
   ``end`` keeps the caption tokens at their positions and, under CLIP's causal text mask,
   keeps their zero-shot states: with the small zoo CLIP (v1), ``front`` with the "a photo of"
   initialisation cost 15 points of image-to-text R@1 before training (measured), ``end``
   with a random initialisation about 3.
2. **Sub-category-sensitive prompt** (``n_cat_ctx`` vectors, ``cat_position``): inserted
   right after (default) or before the sub-category name inside the caption,
   ``prefix <class> P_c suffix``, so it acts where the fine-grained distinction is named
   (after it, it can attend to the name). A caption that does not contain its class name
   gets P_c at its start.
3. **Dynamic token re-weighting by image-text mutual information** (``token_reweight``):
   each caption word token's embedding is scaled by ``w = 1 + strength * tanh(z)``, where
   ``z`` is the token's mutual-information score standardised within its caption (and by the
   running spread of all scores). The score of a vocabulary token is a running mean of its
   pointwise-MI contribution to the matched pair: ``s * (cos(I, T) - cos(I, T without t))``,
   the drop of the pair's log-likelihood under CLIP's softmax model when the token is
   occluded (its embedding zeroed). Initialised on the training pairs in :meth:`setup`
   (frozen CLIP + the initial prompts) and updated every ``mi_every`` training steps from
   the current batch with the current prompts (momentum ``mi_momentum``): this is the
   "dynamic" part. The weights depend on the text only, so a gallery is encoded once.
4. **Category-aware augmentation with multi-perspective hard negatives**
   (``hard_negatives``, ``n_negatives``, ``neg_perspectives``, ``neg_pool``): for each
   training pair, ``n_negatives`` captions are made by swapping its sub-category name with
   another class's. Candidates are the ``neg_pool`` nearest classes under each perspective:
   ``text`` (frozen CLIP text embeddings of "a photo of a {class}."), ``visual`` (mean
   frozen image embeddings of the class's training images), ``random`` (any class). They
   join the image-to-text softmax (``tasks/retrieval.py``).
5. **Category-match weighting** (``category_weighting``, ``match_lambda``): a negative of
   class c' for an anchor of class c gets weight ``1 + lambda * mu(c, c')``, ``mu`` being the
   min-max normalised mean of the perspectives' cosine similarities (1 = the closest class):
   the more the swapped class matches the true one, the more it counts (its logit gets
   ``+log w``).

Departures and choices the paper leaves open:

* Both prompts live on the text side (the paper's figure also prompts the visual side); so
  the frozen image features are cached and training only runs the text encoder (results
  beside the published design in ``docs/dual_prompt.md``).
* Prompt placement (``attr_position``, ``cat_position``) and lengths are ours.
* The MI estimator is an occlusion estimate with a constant-partition assumption, not a
  learned MI bound; the weights scale input embeddings (before positional embeddings).
* The loss is the symmetric CLIP InfoNCE with duplicate captions as soft positives plus the
  weighted hard negatives in the image-to-text direction only (negatives have no image).
* ``prompttune.methods.coop.PromptLearner`` builds prompts for a fixed class list; captions
  change per batch, so the caption prompt assembly is here (and shared by the
  ``coop_retrieval`` baseline in ``retrieval_baselines.py``, which is this class with
  components 2-5 off).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones.clip import CLIPBackbone
from prompttune.data.fdrd import class_pattern, swap_class
from prompttune.methods.base import Method
from prompttune.registry import METHODS

PERSPECTIVES = ("text", "visual", "random")


def split_on_class(caption: str, classname: str) -> tuple[str, str, str] | None:
    """(prefix, class as written, suffix) around the first whole-word, case-insensitive occurrence, else None
    (where the sub-category prompt goes; negatives swap *every* occurrence: ``data.fdrd.swap_class``)."""
    if not classname:
        return None
    m = class_pattern(classname).search(caption)
    if m is None:
        return None
    return caption[:m.start()], m.group(0), caption[m.end():]


@METHODS.register("dual_prompt_text")
class DualPromptText(Method):
    task = "retrieval"
    backbone_kind = CLIPBackbone
    consumes = "image_features"

    def __init__(self, n_attr_ctx: int = 4, attr_init: str | None = "a photo of", n_cat_ctx: int = 2,
                 init_std: float = 0.02, attr_position: str = "end", cat_position: str = "after",
                 token_reweight: bool = True, reweight_strength: float = 0.5,
                 mi_momentum: float = 0.9, mi_every: int = 1, mi_init_max_pairs: int = 512,
                 hard_negatives: bool = True, n_negatives: int = 4, neg_perspectives: list[str] | tuple = ("text", "visual"),
                 neg_pool: int = 3, category_weighting: bool = True, match_lambda: float = 1.0):
        super().__init__()
        bad = [p for p in neg_perspectives if p not in PERSPECTIVES]
        if bad:
            raise ValueError(f"neg_perspectives: unknown {bad}; valid: {', '.join(PERSPECTIVES)}")
        if hard_negatives and (n_negatives < 1 or not neg_perspectives):
            raise ValueError("hard_negatives needs n_negatives >= 1 and at least one of neg_perspectives")
        for name, v in (("n_attr_ctx", n_attr_ctx), ("n_cat_ctx", n_cat_ctx), ("neg_pool", neg_pool),
                        ("mi_every", mi_every - 1)):
            if v < 0:
                raise ValueError(f"{name} must be >= {0 if name != 'mi_every' else 1}, got {v + (name == 'mi_every')}")
        if attr_position not in ("front", "end"):
            raise ValueError(f"attr_position must be 'front' or 'end', not {attr_position!r}")
        if cat_position not in ("before", "after"):
            raise ValueError(f"cat_position must be 'before' or 'after', not {cat_position!r}")
        self.attr_position, self.cat_position = attr_position, cat_position
        if not 0.0 <= reweight_strength < 1.0:
            raise ValueError(f"reweight_strength must be in [0, 1) so that weights stay positive, got {reweight_strength}")
        self.n_attr_ctx, self.attr_init, self.n_cat_ctx, self.init_std = int(n_attr_ctx), attr_init or None, int(n_cat_ctx), init_std
        self.token_reweight, self.reweight_strength = bool(token_reweight), float(reweight_strength)
        self.mi_momentum, self.mi_every, self.mi_init_max_pairs = float(mi_momentum), int(mi_every), int(mi_init_max_pairs)
        self.hard_negatives, self.n_negatives = bool(hard_negatives), int(n_negatives)
        self.neg_perspectives, self.neg_pool = tuple(neg_perspectives), int(neg_pool)
        self.category_weighting, self.match_lambda = bool(category_weighting), float(match_lambda)
        self.attr_ctx: nn.Parameter | None = None
        self.cat_ctx: nn.Parameter | None = None
        # MI scores of seen vocabulary tokens (sorted ids): learned state, saved in checkpoints
        self.register_buffer("mi_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("mi_val", torch.zeros(0))
        self.classnames: list[str] = []
        self._steps = 0
        self._tok_cache: dict[str, list[int]] = {}
        self._gen = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------------ setup
    def setup(self, backbone: CLIPBackbone, datamodule: Any) -> None:
        if not isinstance(backbone, CLIPBackbone):
            raise TypeError(f"{type(self).__name__} needs a CLIP backbone (backbone.name=clip), got {type(backbone).__name__}")
        info = datamodule.info()
        self.classnames = list(info.get("classnames") or [])
        if (self.hard_negatives or self.n_cat_ctx) and not self.classnames:
            raise ValueError(f"{type(self).__name__}: the data module lists no classnames; the sub-category prompt "
                             "and the hard negatives need them (FDRD data gives them)")
        probe = backbone.tokenize([""])[0]
        self._sot, self._eot, self._ctx_len = int(probe[0]), int(probe[1]), probe.shape[0]
        dev, width = backbone.device, backbone.text_width
        self._gen.manual_seed(int(getattr(datamodule, "seed", 0)))
        with torch.no_grad():
            if self.n_attr_ctx or self.attr_init:
                if self.attr_init:
                    ids = self._word_ids(backbone, [self.attr_init])[0]
                    attr = backbone.token_embedding(torch.tensor([ids], device=dev))[0].float().clone()
                    self.n_attr_ctx = len(ids)
                else:
                    attr = torch.randn(self.n_attr_ctx, width, device=dev) * self.init_std
                self.attr_ctx = nn.Parameter(attr)
            if self.n_cat_ctx:
                self.cat_ctx = nn.Parameter(torch.randn(self.n_cat_ctx, width, device=dev) * self.init_std)
        need_train = self.token_reweight or (self.hard_negatives and "visual" in self.neg_perspectives)
        feats, caps, labels = self._train_pairs(backbone, datamodule) if need_train else (None, [], None)
        if self.hard_negatives:
            self._build_negative_pools(backbone, feats, labels)
        if self.token_reweight:
            self._init_mi(backbone, feats, caps, labels)

    def _train_pairs(self, backbone, datamodule):
        """Frozen image features, captions and labels of the training split (one pass, no grad)."""
        datamodule.setup("fit")
        ds = datamodule.datasets.get("train")
        if ds is None or len(ds) == 0:
            raise ValueError(f"{type(self).__name__} needs a training split (data.train_file)")
        loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False, collate_fn=getattr(ds, "collate", None))
        feats, caps, labels = [], [], []
        with torch.no_grad():
            for b in loader:
                feats.append(F.normalize(backbone.encode_image(b["image"].to(backbone.device)).float(), dim=-1))
                caps += list(b["caption"])
                labels.append(b["label"])
        return torch.cat(feats), caps, torch.cat(labels).to(backbone.device)

    def _build_negative_pools(self, backbone, feats, labels) -> None:
        c = len(self.classnames)
        if c < 2:
            raise ValueError("hard negatives need at least two classes")
        dev = backbone.device
        sims = []
        with torch.no_grad():
            if "text" in self.neg_perspectives or self.category_weighting:
                t = backbone.encode_text(backbone.tokenize([f"a photo of a {n}." for n in self.classnames])).float()
                t = F.normalize(t, dim=-1)
                sims.append(("text", t @ t.T))
            if "visual" in self.neg_perspectives:
                proto = torch.zeros(c, feats.shape[1], device=dev).index_add_(0, labels, feats)
                proto = F.normalize(proto, dim=-1)
                has = torch.bincount(labels, minlength=c) > 0
                v = proto @ proto.T
                v[~has] = -1.0
                v[:, ~has] = -1.0
                sims.append(("visual", v))
        eye = torch.eye(c, dtype=torch.bool, device=dev)
        pool = torch.zeros(c, c, dtype=torch.bool, device=dev)
        k = min(self.neg_pool or c - 1, c - 1)
        for name, s in sims:
            if name in self.neg_perspectives:
                top = s.masked_fill(eye, float("-inf")).topk(k, dim=1).indices
                pool.scatter_(1, top, True)
        if "random" in self.neg_perspectives:
            pool |= ~eye
        pool &= ~eye
        mean = torch.stack([s for _, s in sims]).mean(0) if sims else torch.zeros(c, c, device=dev)
        off = mean.masked_fill(eye, float("nan"))
        lo = torch.nan_to_num(off, nan=float("inf")).min(1, keepdim=True).values
        hi = torch.nan_to_num(off, nan=float("-inf")).max(1, keepdim=True).values
        match = ((mean - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1).masked_fill(eye, 0.0)
        self.register_buffer("neg_pool_mask", pool, persistent=False)
        self.register_buffer("class_match", match, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the MI table grows with the vocabulary seen: take the checkpoint's size
        for name in ("mi_ids", "mi_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ tokens
    def _word_ids(self, backbone, texts: list[str]) -> list[list[int]]:
        """Token ids of each text without start/end tokens (cached; tokenised in one batch)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._tok_cache]
        if todo:
            toks = backbone.tokenize(todo).cpu()
            for t, row in zip(todo, toks):
                end = int(row.argmax())  # the end-of-text id is the largest
                self._tok_cache[t] = row[1:end].tolist()
        return [self._tok_cache[t] for t in texts]

    def _assemble(self, backbone, captions: list[str], labels: list[int]):
        """Token ids [N, L], prompt-slot index [N, L] (-1: none) and word-token mask [N, L]."""
        n_a, n_c, L = self.n_attr_ctx if self.attr_ctx is not None else 0, self.n_cat_ctx, self._ctx_len
        pieces = []
        for cap, lab in zip(captions, labels):
            parts = split_on_class(cap, self.classnames[lab]) if (n_c and 0 <= lab < len(self.classnames)) else None
            pieces.append(parts if parts is not None else ("", "", cap))
        flat = [p for trip in pieces for p in trip]
        ids = self._word_ids(backbone, flat)
        rows, slots, words = [], [], []
        for i in range(len(captions)):
            pre, cls, suf = ids[3 * i], ids[3 * i + 1], ids[3 * i + 2]
            # (token id, prompt slot or -1, is a caption word) for each position between SOT and EOT
            cat = [(0, n_a + j, False) for j in range(n_c)]
            body = ([(t, -1, True) for t in pre]
                    + (cat + [(t, -1, True) for t in cls] if self.cat_position == "before"
                       else [(t, -1, True) for t in cls] + cat)
                    + [(t, -1, True) for t in suf])
            attr = [(0, j, False) for j in range(n_a)]
            room = L - 2 - n_a
            if room < n_c + 1:
                raise ValueError(f"context length {L} leaves no room for the caption after {n_a + n_c} prompt tokens")
            body = body[:room]  # truncate the caption, never the prompts or the end-of-text token
            if n_c and not any(s >= n_a for _, s, _ in body):
                body = (cat + body)[:room]
            seq = [(self._sot, -1, False)] + (attr + body if self.attr_position == "front" else body + attr)
            seq.append((self._eot, -1, False))
            seq += [(0, -1, False)] * (L - len(seq))
            rows.append([t for t, _, _ in seq])
            slots.append([s for _, s, _ in seq])
            words.append([w for _, _, w in seq])
        dev = backbone.device
        return (torch.tensor(rows, device=dev), torch.tensor(slots, device=dev), torch.tensor(words, device=dev))

    def _prompts(self) -> torch.Tensor | None:
        ctx = [p for p in (self.attr_ctx, self.cat_ctx) if p is not None]
        return torch.cat(ctx) if ctx else None

    def _embed(self, backbone, tokens, slots, words, weights: torch.Tensor | None = None) -> torch.Tensor:
        emb = backbone.token_embedding(tokens).float()
        ctx = self._prompts()
        if ctx is not None:
            emb = torch.where((slots >= 0)[..., None], ctx[slots.clamp(min=0)], emb)
        if weights is not None:
            emb = emb * weights[..., None]
        return emb

    def token_weights(self, tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor | None:
        """Per-position weights from the MI scores (1 outside caption words and for unseen tokens)."""
        if not self.token_reweight or self.mi_ids.numel() == 0:
            return None
        pos = torch.searchsorted(self.mi_ids, tokens).clamp(max=self.mi_ids.numel() - 1)
        seen = (self.mi_ids[pos] == tokens) & words
        m = torch.where(seen, self.mi_val[pos], torch.zeros_like(self.mi_val[pos]))
        cnt = seen.sum(1, keepdim=True).clamp(min=1)
        mean = m.sum(1, keepdim=True) / cnt
        spread = self.mi_val.std().clamp(min=1e-6) if self.mi_val.numel() > 1 else self.mi_val.new_tensor(1.0)
        z = (m - mean) / spread
        w = 1.0 + self.reweight_strength * torch.tanh(z)
        return torch.where(seen, w, torch.ones_like(w))

    def encode_captions(self, backbone, captions: list[str], labels: list[int]) -> torch.Tensor:
        """Normalised prompted caption embeddings [N, D]; duplicate captions are encoded once."""
        key = list(dict.fromkeys(zip(captions, labels)))
        where = {k: i for i, k in enumerate(key)}
        tokens, slots, words = self._assemble(backbone, [c for c, _ in key], [l for _, l in key])
        emb = self._embed(backbone, tokens, slots, words, self.token_weights(tokens, words))
        feats = F.normalize(backbone.encode_text_embeddings(emb, tokens).float(), dim=-1)
        return feats[torch.tensor([where[k] for k in zip(captions, labels)], device=feats.device)]

    # ------------------------------------------------------------------ MI scores
    @torch.no_grad()
    def _occlusion_mi(self, backbone, img: torch.Tensor, captions: list[str], labels: list[int]):
        """(token ids, PMI drops) of every caption word token, occluding one token at a time."""
        tokens, slots, words = self._assemble(backbone, captions, labels)
        weights = self.token_weights(tokens, words)
        emb = self._embed(backbone, tokens, slots, words, weights)
        scale = float(backbone.logit_scale)
        full = (F.normalize(backbone.encode_text_embeddings(emb, tokens).float(), dim=-1) * img).sum(-1)
        rows, cols = torch.nonzero(words, as_tuple=True)
        if rows.numel() == 0:
            return tokens.new_zeros(0), img.new_zeros(0)
        drops = []
        for s in range(0, rows.numel(), 512):
            r, c = rows[s:s + 512], cols[s:s + 512]
            e = emb[r].clone()
            e[torch.arange(len(r), device=e.device), c] = 0.0
            t = F.normalize(backbone.encode_text_embeddings(e, tokens[r]).float(), dim=-1)
            drops.append(scale * (full[r] - (t * img[r]).sum(-1)))
        return tokens[rows, cols], torch.cat(drops)

    @torch.no_grad()
    def _update_mi(self, ids: torch.Tensor, drops: torch.Tensor, momentum: float) -> None:
        uniq, inv = torch.unique(ids, return_inverse=True)
        mean = torch.zeros(len(uniq), device=drops.device).index_add_(0, inv, drops)
        mean = mean / torch.bincount(inv, minlength=len(uniq)).float()
        all_ids = torch.unique(torch.cat([self.mi_ids.to(uniq.device), uniq]))
        vals = torch.zeros(len(all_ids), device=drops.device)
        if self.mi_ids.numel():
            vals[torch.searchsorted(all_ids, self.mi_ids.to(all_ids.device))] = self.mi_val.to(drops.device)
        pos = torch.searchsorted(all_ids, uniq)
        known = torch.isin(uniq, self.mi_ids.to(uniq.device))
        vals[pos] = torch.where(known, momentum * vals[pos] + (1 - momentum) * mean, mean)
        self.mi_ids, self.mi_val = all_ids, vals

    def _init_mi(self, backbone, feats, caps, labels) -> None:
        n = min(len(caps), self.mi_init_max_pairs)
        idx = torch.randperm(len(caps), generator=self._gen)[:n].tolist()
        ids, drops = self._occlusion_mi(backbone, feats[idx], [caps[i] for i in idx], [int(labels[i]) for i in idx])
        self.mi_ids, self.mi_val = ids.new_zeros(0), drops.new_zeros(0)
        if ids.numel():
            self._update_mi(ids, drops, momentum=0.0)

    # ------------------------------------------------------------------ negatives
    def sample_negatives(self, captions: list[str], labels: list[int]):
        """Sub-category-swapped captions [B*M], their classes [B*M] and log-weights [B, M]."""
        m = self.n_negatives
        pool = self.neg_pool_mask.cpu()
        match = self.class_match.cpu()
        negs, neg_labels, logw = [], [], torch.zeros(len(captions), m)
        for b, (cap, lab) in enumerate(zip(captions, labels)):
            cands = torch.nonzero(pool[lab]).flatten()
            order = cands[torch.randperm(len(cands), generator=self._gen)][:m]
            for j in range(m):
                new = None
                if j < len(order):
                    c = int(order[j])
                    new = swap_class(cap, self.classnames[lab], self.classnames[c])
                if new is None:  # class name not in the caption, or too few candidates: drop the slot
                    negs.append(cap)
                    neg_labels.append(lab)
                    logw[b, j] = float("-inf")
                    continue
                negs.append(new)
                neg_labels.append(c)
                if self.category_weighting:
                    logw[b, j] = math.log1p(self.match_lambda * float(match[lab, c]))
        return negs, neg_labels, logw

    # ------------------------------------------------------------------ forward
    def forward(self, backbone, batch: dict[str, Any]) -> dict[str, Any]:
        img = F.normalize(batch["features"].float(), dim=-1)
        captions = list(batch["caption"])
        labels = [int(l) for l in batch["label"]] if "label" in batch else [-1] * len(captions)
        out = {"image_features": img, "logit_scale": backbone.logit_scale.float()}
        if self.training and self.token_reweight and self._steps % self.mi_every == 0:
            ids, drops = self._occlusion_mi(backbone, img, captions, labels)
            if ids.numel():
                self._update_mi(ids, drops, self.mi_momentum)
        if self.training:
            self._steps += 1
        out["text_features"] = self.encode_captions(backbone, captions, labels)
        b = len(captions)
        if self.training and self.hard_negatives:
            negs, neg_labels, logw = self.sample_negatives(captions, labels)
            out["neg_text_features"] = self.encode_captions(backbone, negs, neg_labels).view(b, self.n_negatives, -1)
            out["neg_log_weight"] = logw.to(img.device)
        elif not self.training and batch.get("negatives") and len(batch["negatives"][0]):
            m = len(batch["negatives"][0])
            flat = [n for row in batch["negatives"] for n in row]
            nl = batch["neg_labels"].flatten().tolist() if "neg_labels" in batch else [-1] * len(flat)
            out["neg_text_features"] = self.encode_captions(backbone, flat, nl).view(b, m, -1)
        return out
