"""MMICT's M-Hub: multi-modal in-context tuning over a frozen BLIP-2.

Paper: "MMICT: Boosting Multi-Modal Fine-Tuning with In-Context Examples" (Chen et al.,
arXiv 2312.06363; code KDEGroup/MMICT, ``lavis/models/blip2_models/blip2_t5.py``).

What each part implements:

* **M-Hub** (the paper's method section and overview figure): the Q-Former fed with instruction text next to its learned
  queries, cross-attending to the frozen ViT tokens (``run_qformer``).
  - each *demonstration* (image, text = instruction + its target) contributes its
    **visual-guided textual features**: the hub outputs at the text positions, projected
    into the LM's embedding space (official: ``inputs_t5[..., query_len:]``);
  - the *query* contributes its **text-guided visual features**: the outputs at the query
    positions (the hub sees the query's instruction), followed by the LM's own embeddings
    of the instruction (official: ``inputs_t5[..., :query_len]`` + ``embed_tokens(text)``).
* **Segments** are joined with an end-of-chunk token ``<|endofchunk|>`` (official: a token
  added to the T5 tokenizer; its LM embedding is used as is). Order: ``demo_1 EOC ...
  demo_k EOC query``.
* **Loss**: the LM's token cross-entropy on the target text; the ViT and the LM
  are frozen; trainable: the hub (Q-Former incl. its text embeddings and text feed-forward),
  the query tokens and the projection.
* **Demonstrations**: ``k`` per query from the training pool, ``selection: random`` or
  ``similar`` (cosine similarity of mean-pooled frozen ViT features; most similar last,
  nearest the query). During training a query never gets its own image as a demonstration.

Ownership: the Q-Former, query tokens and projection belong to the frozen backbone object,
so :meth:`setup` **deep-copies** them (and the Q-Former text embeddings) into this method:
the backbone stays frozen and untouched, and checkpoints hold only the hub
(``trainable_state``). The frozen ViT features of the demonstration pool are computed once
in :meth:`setup` (non-persistent buffers: never checkpointed) and reused every step.

Departures from the paper / official code:

* Generation (``generate``) builds exactly the training format (demonstrations, EOC,
  query); the official ``generate()`` ignores demonstrations, and its evaluation is empty.
* Demonstrations are drawn by the method from the training set (random or by similarity);
  the official loader reads pre-grouped ``dialog_id`` samples whose grouping is not released.
* The paper trains a BLIP-2 FlanT5-XL; here any BLIP-2 (OPT or T5) works, by default the
  offline ``blip2-tiny`` (OPT). For decoder-only LMs a BOS embedding precedes the query's
  instruction, as BLIP-2 OPT places it after the image tokens.
* When the tokenizer has no ``<|endofchunk|>`` token (released checkpoints), the EOC is a
  fixed random vector (seeded, scaled to the LM's embedding statistics) instead of a newly
  added, resized vocabulary row: resizing would modify the frozen backbone.
* Released checkpoints lack the Q-Former text feed-forward; it is initialised from the
  query feed-forward (see ``backbones/blip2.py``).
* Hyper-parameters (lr 1e-5, 1000 warm-up steps, 5 epochs, batch 48x4, beam 5) are the
  paper's for FlanT5-XL; the shipped configs use a small-model regime (see docs/mmict.md).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from prompttune.backbones.blip2 import EOC_TOKEN, Blip2Backbone, qformer_with_text_ffn, run_qformer
from prompttune.methods.base import Method
from prompttune.registry import METHODS


class InContextBLIP2(Method):
    """Shared machinery: demonstration pool and selection, segment assembly, loss, generation."""

    task = "captioning"
    backbone_kind = Blip2Backbone
    consumes = "images"
    uses_demonstrations = True

    def __init__(self, k: int = 2, selection: str = "random", pool_size: int = 256, max_new_tokens: int = 12,
                 min_new_tokens: int = 1, num_beams: int = 1, max_text_len: int = 32, seed: int | None = None, **_: Any):
        super().__init__()
        if selection not in ("random", "similar"):
            raise ValueError(f"method.selection must be 'random' or 'similar', not {selection!r}")
        if int(k) < 0:
            raise ValueError(f"method.k (demonstrations per query) must be >= 0, got {k}")
        if not self.uses_demonstrations and int(k) != 0:
            raise ValueError(f"{type(self).__name__} uses no demonstrations; method.k must be 0, got {k}")
        self.k, self.selection, self.pool_size = int(k), selection, int(pool_size)
        self.max_new_tokens, self.min_new_tokens, self.num_beams = int(max_new_tokens), int(min_new_tokens), int(num_beams)
        self.max_text_len = int(max_text_len)
        self.seed = None if seed is None else int(seed)
        self.pool_text: list[str] = []
        self.pool_image_key: list[str] = []
        self.pool_of_index: dict[int, int] = {}
        self._ready = False

    # ------------------------------------------------------------------ setup
    def setup(self, backbone: nn.Module, datamodule: Any) -> None:
        if not isinstance(backbone, Blip2Backbone):
            raise TypeError(f"{type(self).__name__} needs the 'blip2' backbone, got {type(backbone).__name__}")
        if self.seed is None:  # the run's seed (runs seed every RNG before setup)
            self.seed = int(torch.initial_seed()) % (2**31)
        self.build_trainable(backbone)
        self._init_eoc(backbone)
        if self.k > 0:
            self._build_pool(backbone, datamodule)
        self._ready = True

    def build_trainable(self, backbone: Blip2Backbone) -> None:
        raise NotImplementedError

    def _init_eoc(self, backbone: Blip2Backbone) -> None:
        eid = backbone.token_id(EOC_TOKEN)
        with torch.no_grad():
            if eid is not None:
                eoc = backbone.lm_embed(torch.tensor([eid], device=backbone.device))[0].detach().clone()
            else:
                w = backbone.model.get_input_embeddings().weight
                g = torch.Generator().manual_seed(self.seed)
                eoc = (torch.randn(w.shape[1], generator=g) * w.std().cpu() + w.mean().cpu()).to(w)
        self.register_buffer("eoc", eoc.float(), persistent=True)

    @torch.no_grad()
    def _build_pool(self, backbone: Blip2Backbone, datamodule: Any) -> None:
        if not getattr(datamodule, "datasets", None):
            datamodule.setup("fit")
        ds = datamodule.datasets.get("train")
        if ds is None or len(ds) == 0:
            raise ValueError(f"{type(self).__name__} with k={self.k} needs a training split to draw demonstrations from")
        n = len(ds)
        rows = list(range(n))
        if n > self.pool_size:
            g = torch.Generator().manual_seed(self.seed)
            rows = sorted(torch.randperm(n, generator=g)[: self.pool_size].tolist())
        feats = []
        for i in range(0, len(rows), 64):
            imgs = torch.stack([ds.image(j) for j in rows[i:i + 64]]).to(backbone.device)
            feats.append(backbone.encode_images(imgs))
        feats = torch.cat(feats)
        self.register_buffer("pool_feats", feats, persistent=False)  # frozen ViT tokens [P, N, Dv]
        pooled = nn.functional.normalize(feats.mean(1).float(), dim=-1)
        self.register_buffer("pool_pooled", pooled, persistent=False)
        self.pool_text = [self.demo_text(ds.rows[j]["prompt"], ds.rows[j]["target"]) for j in rows]
        self.pool_image_key = ["|".join(ds.rows[j]["paths"]) for j in rows]
        self.pool_of_index = {j: p for p, j in enumerate(rows)}

    @staticmethod
    def demo_text(prompt: str, target: str) -> str:
        return f"{prompt} {target}"

    # ------------------------------------------------------------------ demonstrations
    def select(self, batch: dict[str, Any], query_pooled: torch.Tensor) -> torch.Tensor:
        """[B, k] pool positions; a training query never sees its own image."""
        b, p = query_pooled.shape[0], self.pool_feats.shape[0]
        dev = query_pooled.device
        banned = torch.zeros(b, p, dtype=torch.bool, device=dev)
        splits = batch.get("split") or ["?"] * b
        for i in range(b):
            if splits[i] == "train":
                pos = self.pool_of_index.get(int(batch["index"][i]))
                if pos is not None:
                    key = self.pool_image_key[pos]
                    banned[i] = torch.tensor([k == key for k in self.pool_image_key], device=dev)
        if int((~banned).sum(1).min()) < self.k:
            raise ValueError(f"demonstration pool too small: {p} items, k={self.k}")
        if self.selection == "similar":
            score = nn.functional.normalize(query_pooled.float(), dim=-1) @ self.pool_pooled.T
        elif self.training:
            score = torch.rand(b, p, device=dev)
        else:  # deterministic per test sample, so every method and epoch sees the same demos
            score = torch.stack([torch.rand(p, generator=torch.Generator().manual_seed(self.seed * 1000003 + int(ix)))
                                 for ix in batch["index"]]).to(dev)
        score = score.masked_fill(banned, -math.inf)
        top = score.topk(self.k, dim=1).indices  # best first
        return top.flip(1)  # most similar (or first drawn) last, nearest the query

    # ------------------------------------------------------------------ sequences
    def assemble(self, segments: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate each sample's segments and left-pad: ([B, T, D], [B, T])."""
        seqs = [torch.cat(s, dim=0) for s in segments]
        t = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        out = seqs[0].new_zeros(len(seqs), t, d)
        mask = torch.zeros(len(seqs), t, dtype=torch.long, device=seqs[0].device)
        for i, s in enumerate(seqs):
            out[i, t - s.shape[0]:] = s
            mask[i, t - s.shape[0]:] = 1
        return out, mask

    def query_tail(self, backbone: Blip2Backbone, prompts: list[str]) -> list[torch.Tensor]:
        """[BOS] + LM embeddings of each query's instruction (padding removed)."""
        ids, m = backbone.tokenize(prompts, max_length=self.max_text_len)
        emb = backbone.lm_embed(ids)
        bos = backbone.bos_embedding()
        out = []
        for i in range(len(prompts)):
            e = emb[i][m[i].bool()]
            out.append(torch.cat([bos, e]) if bos is not None else e)
        return out

    def build_prefix(self, backbone: Blip2Backbone, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, backbone: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}.setup(backbone, datamodule) must run before forward")
        with self.lm_context(backbone):
            prefix, mask = self.build_prefix(backbone, batch)
            if self.training:
                ids, m = backbone.tokenize(batch["target"], add_eos=True, max_length=self.max_text_len)
                return {"loss": backbone.lm_loss(prefix, mask, ids, m)}
            preds = backbone.lm_generate(prefix, mask, max_new_tokens=self.max_new_tokens,
                                         num_beams=self.num_beams, min_new_tokens=self.min_new_tokens)
        return {"predictions": preds}

    def lm_context(self, backbone: Blip2Backbone):
        import contextlib

        return contextlib.nullcontext()


class _HubCopy(InContextBLIP2):
    """Holds a trainable copy of the backbone's Q-Former, query tokens and projection."""

    with_text = True

    def build_trainable(self, backbone: Blip2Backbone) -> None:
        if self.with_text:
            self.hub = qformer_with_text_ffn(backbone.qformer)
        else:  # queries only: hold no text feed-forward it would never train
            self.hub = copy.deepcopy(backbone.qformer)
            for layer in self.hub.encoder.layer:
                for name in ("intermediate", "output"):
                    if hasattr(layer, name):
                        delattr(layer, name)
            self.hub.config.use_qformer_text_input = False
        self.hub.requires_grad_(True)
        self.query_tokens = nn.Parameter(backbone.query_tokens.detach().clone())
        self.proj = copy.deepcopy(backbone.language_projection).requires_grad_(True)
        if self.with_text:
            self.text_embeddings = copy.deepcopy(backbone.qformer_text_embeddings).requires_grad_(True)
        self.hub.train(self.training)

    @property
    def nq(self) -> int:
        return self.query_tokens.shape[1]


@METHODS.register("mhub")
class MHub(_HubCopy):
    def _hub_text(self, backbone, image_embeds, texts):
        ids, m = backbone.tokenize(texts, qformer=True, max_length=self.max_text_len)
        h = run_qformer(self.hub, self.query_tokens, image_embeds, self.text_embeddings, ids, m)
        return self.proj(h), m

    def build_prefix(self, backbone, batch):
        img = backbone.encode_images(batch["image"])  # frozen, no grad
        b = img.shape[0]
        vis, _ = self._hub_text(backbone, img, batch["prompt"])
        query_vis = vis[:, : self.nq]  # text-guided visual features
        tails = self.query_tail(backbone, batch["prompt"])
        segs: list[list[torch.Tensor]] = [[] for _ in range(b)]
        if self.k:
            idx = self.select(batch, img.mean(1))
            flat = idx.reshape(-1)
            texts = [self.pool_text[j] for j in flat.tolist()]
            dfeat, dmask = self._hub_text(backbone, self.pool_feats[flat], texts)
            dfeat = dfeat[:, self.nq:]  # visual-guided textual features
            eoc = self.eoc.to(dfeat.dtype)[None]
            for i in range(b):
                for j in range(self.k):
                    r = i * self.k + j
                    segs[i] += [dfeat[r][dmask[r].bool()], eoc]
        for i in range(b):
            segs[i] += [query_vis[i], tails[i].to(query_vis.dtype)]
        return self.assemble(segs)
