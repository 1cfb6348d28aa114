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
* **Demonstrations**: ``k`` per query, drawn from the *whole* training split,
  ``selection: random`` or ``similar`` (cosine similarity of mean-pooled frozen ViT features,
  held per training image -- the only thing stored; most similar last, nearest the query). A
  query never gets its own image as a demonstration (any split, either selection), and the
  ``k`` demonstrations of a query show ``k`` different images.
* **Demonstration text** (``demo_text``): ``target`` -- the bare caption, as official MMICT
  (``blip2_t5.py``: only the query's text is split into instruction and target) -- or
  ``prompt`` -- "<instruction> <target>" (the commented VQA branch of the official code formats
  demonstrations as "Question: {q}Short answer:" + answer).
* ``demo_padding: true`` (official): the Q-Former text of the whole batch (demonstrations and
  queries) is tokenised together, padded to the longest, and each demonstration contributes its
  hub outputs at *every* text position, padding included, all attended by the LM (official
  ``inputs_t5[i, query_len:]`` with ``atts_t5`` all ones). ``false``: only its real tokens.
* ``train_ln_vision: true`` (official: ``ln_vision`` is outside the frozen ``visual_encoder``):
  a trainable copy of the ViT's final LayerNorm (HF ``post_layernorm``) over pre-norm ViT tokens.

Ownership: the Q-Former, query tokens and projection belong to the frozen backbone object,
so :meth:`setup` **deep-copies** them (and the Q-Former text embeddings, and ``ln_vision`` when
trained) into this method: the backbone stays frozen and untouched, and checkpoints hold only
the hub (``trainable_state``). Demonstration images are read and encoded by the frozen ViT at
each step, as the official model encodes every image of its batch; only their pooled
features (``selection: similar``) are kept, as non-persistent buffers.

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
* The Q-Former text path of released HF checkpoints comes from ``backbone.qformer_text_from``
  (LAVIS checkpoint or bert-base-uncased); see ``backbones/blip2.py``.
* Hyper-parameters: the paper's regime is in ``experiments/paper/mmict_*.yaml``; the method
  configs use a small-model regime for the offline zoo (see docs/mmict.md).
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


DATA_KIND_OF_TASK = {"captioning": "caption", "vqa": "vqa"}
UNK_WARN_RATE = 0.05  # warn when more than this share of the training targets' LM tokens are <unk>


class InContextBLIP2(Method):
    """Shared machinery: demonstration pool and selection, segment assembly, loss, generation."""

    task = "captioning"
    backbone_kind = Blip2Backbone
    consumes = "images"
    uses_demonstrations = True
    feeds_qformer_text = False  # True: the method needs the backbone's Q-Former text path

    def __init__(self, k: int = 2, selection: str = "random", max_new_tokens: int = 12,
                 min_new_tokens: int = 1, num_beams: int = 1, max_text_len: int = 32, seed: int | None = None,
                 demo_text: str = "prompt", demo_padding: bool = False, train_ln_vision: bool = False, **_: Any):
        super().__init__()
        if selection not in ("random", "similar"):
            raise ValueError(f"method.selection must be 'random' or 'similar', not {selection!r}")
        if demo_text not in ("target", "prompt"):
            raise ValueError(f"method.demo_text must be 'target' (the bare caption, official) or 'prompt' "
                             f"(instruction + target), not {demo_text!r}")
        if int(k) < 0:
            raise ValueError(f"method.k (demonstrations per query) must be >= 0, got {k}")
        if not self.uses_demonstrations and int(k) != 0:
            raise ValueError(f"{type(self).__name__} uses no demonstrations; method.k must be 0, got {k}")
        self.k, self.selection = int(k), selection
        self.max_new_tokens, self.min_new_tokens, self.num_beams = int(max_new_tokens), int(min_new_tokens), int(num_beams)
        self.max_text_len = int(max_text_len)
        self.seed = None if seed is None else int(seed)
        self.demo_text_mode, self.demo_padding, self.train_ln_vision = demo_text, bool(demo_padding), bool(train_ln_vision)
        self.unk_rate: float | None = None
        self._pool_rows: list[dict[str, Any]] = []
        self._pool_ds: Any = None
        self._ready = False

    # ------------------------------------------------------------------ compose-time checks
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from prompttune.config import ConfigError
        from prompttune.registry import DATASETS

        m = cfg.method
        for key, valid in (("selection", ("random", "similar")), ("demo_text", ("target", "prompt"))):
            if key in m and m[key] not in valid:
                raise ConfigError(f"method.{key}={m[key]!r}: expected one of {', '.join(valid)}")
        k = m.get("k", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"method.k={k!r}: expected a whole number of demonstrations >= 0")
        if not cls.uses_demonstrations and k != 0:
            raise ConfigError(f"method.k={k}: {m.name} uses no demonstrations, so k must be 0")
        for key in ("max_new_tokens", "num_beams", "max_text_len"):
            v = m.get(key, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"method.{key}={v!r}: expected a whole number >= 1")
        if m.get("min_new_tokens", 0) > m.get("max_new_tokens", 1):
            raise ConfigError(f"method.min_new_tokens={m.min_new_tokens} exceeds method.max_new_tokens="
                              f"{m.max_new_tokens}")
        # the data's kind must be what the task scores (VQAv2 under captioning would report CIDEr)
        want = DATA_KIND_OF_TASK.get(str(cfg.task.name))
        data_cls = DATASETS.get(cfg.data.name) if cfg.data.name in DATASETS else None
        kind = getattr(data_cls, "kind", None)
        if want is None:
            raise ConfigError(f"task={cfg.task.name!r}: {m.name} generates text; expected task captioning or vqa")
        if kind is not None and kind != want:
            fits = [t for t, k_ in DATA_KIND_OF_TASK.items() if k_ == kind]
            raise ConfigError(f"data={cfg.data.name!r} holds {kind} samples, but task={cfg.task.name!r} scores "
                              f"{want} samples; use task={fits[0] if fits else '?'} or a {want} dataset")
        b = cfg.backbone
        if cls.feeds_qformer_text and b.get("name") == "blip2" and not b.get("zoo_entry") and b.get("model") \
                and not b.get("qformer_text_from") and not b.get("qformer_text_random") \
                and str(b.get("weights", "pretrained")) == "pretrained":
            from pathlib import Path

            from prompttune.backbones.blip2 import QFORMER_TEXT_FILE, QFORMER_TEXT_REMEDY

            if not (Path(str(b.model)).expanduser() / QFORMER_TEXT_FILE).is_file():
                raise ConfigError(f"backbone.model={b.model!r} has no Q-Former text embeddings or text feed-forward "
                                  f"(released HF BLIP-2 checkpoints drop them) and {m.name} feeds text to the "
                                  f"Q-Former: " + QFORMER_TEXT_REMEDY)

    # ------------------------------------------------------------------ setup
    def setup(self, backbone: nn.Module, datamodule: Any) -> None:
        if not isinstance(backbone, Blip2Backbone):
            raise TypeError(f"{type(self).__name__} needs the 'blip2' backbone, got {type(backbone).__name__}")
        if self.feeds_qformer_text:
            backbone.require_qformer_text(type(self).__name__)
        if self.seed is None:  # the run's seed (runs seed every RNG before setup)
            self.seed = int(torch.initial_seed()) % (2**31)
        self.build_trainable(backbone)
        if self.train_ln_vision:
            self.ln_vision = copy.deepcopy(backbone.ln_vision).requires_grad_(True)
        self._init_eoc(backbone)
        ds = self._train_split(datamodule)
        if ds is not None:
            self.unk_rate = self._check_unk_rate(backbone, [r["target"] for r in ds.rows])
        if self.k > 0:
            if ds is None:
                raise ValueError(f"{type(self).__name__} with k={self.k} needs a training split to draw "
                                 "demonstrations from")
            self._build_pool(backbone, ds)
        self._ready = True

    def build_trainable(self, backbone: Blip2Backbone) -> None:
        raise NotImplementedError

    def param_groups(self, cfg: Any) -> list[dict[str, Any]]:
        """LAVIS's weight-decay groups (MMICT ``lavis/runners/runner_base.py:105-122``): no decay on
        1-D tensors, biases and norms (names with "ln"/"bn"); ``optim.weight_decay`` on the rest."""
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n else decay).append(p)
        return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]

    @staticmethod
    def _train_split(datamodule: Any):
        if datamodule is None:
            return None
        if not getattr(datamodule, "datasets", None):
            datamodule.setup("fit")
        ds = datamodule.datasets.get("train")
        return ds if ds is not None and len(ds) else None

    def _check_unk_rate(self, backbone: Blip2Backbone, targets: list[str], sample: int = 2000) -> float:
        """Share of the training targets' LM tokens that the tokenizer maps to ``<unk>`` (warned about
        above 5 %: the zoo's word-level tokenizer knows only the synthetic world's words)."""
        tok = backbone.tokenizer
        if tok.unk_token_id is None or not targets:
            return 0.0
        step = max(1, len(targets) // sample)
        ids = tok(list(targets[::step]), add_special_tokens=False).input_ids
        n = sum(len(x) for x in ids)
        rate = sum(int(t == tok.unk_token_id) for x in ids for t in x) / max(n, 1)
        if rate > UNK_WARN_RATE:
            import warnings

            warnings.warn(f"{rate:.0%} of the training targets' tokens are {tok.unk_token!r} under {backbone.name}'s "
                          f"tokenizer: the model cannot read or produce those words (the zoo BLIP-2 knows only the "
                          f"synthetic world's vocabulary; use a released BLIP-2 for real captions)", stacklevel=2)
        return rate

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

    # ------------------------------------------------------------------ demonstration pool
    @torch.no_grad()
    def _build_pool(self, backbone: Blip2Backbone, ds: Any) -> None:
        """The whole training split: per row its image id (rows of one image share it: five COCO
        captions, one photo); for ``similar``, one pooled feature per image -- nothing else."""
        self._pool_ds, self._pool_rows = ds, ds.rows
        keys: dict[str, int] = {}
        first_row: list[int] = []
        image_of_row = []
        for j, r in enumerate(ds.rows):
            key = image_key(r)
            if key not in keys:
                keys[key] = len(first_row)
                first_row.append(j)
            image_of_row.append(keys[key])
        self.pool_image_ids = keys
        self.register_buffer("pool_image_of_row", torch.tensor(image_of_row, dtype=torch.long), persistent=False)
        rows_of_image: list[list[int]] = [[] for _ in first_row]
        for j, i in enumerate(image_of_row):
            rows_of_image[i].append(j)
        self.pool_rows_of_image = rows_of_image
        if len(first_row) <= self.k:
            raise ValueError(f"demonstration pool too small: {len(first_row)} training images, k={self.k} "
                             "(a query's own image is never its demonstration)")
        if self.selection == "similar":
            def compute():
                feats = []
                for i in range(0, len(first_row), 64):
                    imgs = torch.stack([ds.image(j, augment=False) for j in first_row[i:i + 64]]).to(backbone.device)
                    feats.append(backbone.encode_images(imgs).mean(1).float())
                pooled = torch.cat(feats)
                return pooled, torch.ones(len(pooled), dtype=torch.bool)

            pooled = _stored_pool_features(backbone, ds, first_row, compute)
            self.register_buffer("pool_pooled", nn.functional.normalize(pooled.to(backbone.device), dim=-1),
                                 persistent=False)

    def demo_text(self, row: dict[str, Any]) -> str:
        if self.demo_text_mode == "target":
            return row["target"]
        return f"{first_prompt(row['prompt'])} {row['target']}"

    def select(self, batch: dict[str, Any], query_pooled: torch.Tensor | None = None) -> list[list[int]]:
        """``k`` training rows per query (most similar / last drawn nearest the query), never of
        the query's own image, ``k`` different images. Training draws use the global RNG (seeded
        by the run); evaluation draws are fixed per test item, so every method and epoch sees the
        same demonstrations."""
        b = len(batch["index"])
        keys = batch.get("image_key") or [None] * b
        own = [self.pool_image_ids.get(k_, -1) if k_ is not None else -1 for k_ in keys]
        gens = [None if self.training else
                torch.Generator().manual_seed(self.seed * 1000003 + int(ix)) for ix in batch["index"]]
        if self.selection == "similar":
            if query_pooled is None:
                raise ValueError("selection 'similar' needs the queries' pooled features")
            score = nn.functional.normalize(query_pooled.float(), dim=-1) @ self.pool_pooled.T
            for i, o in enumerate(own):
                if o >= 0:
                    score[i, o] = -math.inf
            images = score.topk(self.k, dim=1).indices.flip(1).tolist()  # most similar last
        else:
            n_img = len(self.pool_rows_of_image)
            images = []
            for i in range(b):
                picked: list[int] = []
                while len(picked) < self.k:
                    cand = int(torch.randint(n_img, (1,), generator=gens[i]))
                    if cand != own[i] and cand not in picked:
                        picked.append(cand)
                images.append(picked)
        out = []
        for i in range(b):
            row = []
            for img in images[i]:
                rows = self.pool_rows_of_image[img]
                row.append(rows[int(torch.randint(len(rows), (1,), generator=gens[i]))] if len(rows) > 1 else rows[0])
            out.append(row)
        return out

    def demo_images(self, rows: list[int], device: torch.device) -> torch.Tensor:
        """Demonstration pixels: training augmentation while training, the evaluation transform else."""
        return torch.stack([self._pool_ds.image(j, augment=self.training) for j in rows]).to(device)

    # ------------------------------------------------------------------ vision
    def vision_tokens(self, backbone: Blip2Backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ViT tokens as the Q-Former sees them, frozen mean-pooled features for selection)."""
        if not self.train_ln_vision:
            feats = backbone.encode_images(images)
            return feats, feats.mean(1)
        pre = backbone.encode_images(images, pre_ln=True)
        with torch.no_grad():
            pooled = backbone.ln_vision(pre).mean(1)
        return self.ln_vision(pre), pooled

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
        """[BOS] + LM embeddings of each instruction (padding removed; Flan-T5: ending in ``</s>``)."""
        ids, m = backbone.prompt_ids(prompts, max_length=self.max_text_len)
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


def image_key(row: dict[str, Any]) -> str:
    """One key per image (or frame list): rows of the same image share it."""
    return "|".join(row["paths"])


def first_prompt(prompt: str | list[str]) -> str:
    return prompt if isinstance(prompt, str) else prompt[0]


def _stored_pool_features(backbone: Blip2Backbone, ds: Any, first_row: list[int], compute) -> torch.Tensor:
    """The demonstration pool's pooled frozen ViT features, through the frozen-feature store
    (prompttune.features): keyed by the vision tower's weights, the transform and the pool's
    image files, so every run of a sweep over one pool computes them once. A transform that
    randomises (or cannot be described) is never stored."""
    from prompttune import features

    tkey = features.transform_key(getattr(ds, "transform", None))
    vision = getattr(getattr(backbone, "model", None), "vision_model", None)
    if tkey is None or vision is None:
        return compute()[0]
    paths = ["|".join(ds.rows[j]["paths"]) for j in first_row]
    files = [p for j in first_row for p in ds.rows[j]["paths"]]
    key = {"format": features.FORMAT, "kind": "mhub-pool-pooled", "weights": features.weights_fingerprint(vision),
           "transform": tkey, "images": f"{len(paths)}:{features.paths_key(files).split(':', 1)[1]}",
           "groups": features.key_digest({"rows": paths})}
    return features.FeatureStore().get_or_compute(key, compute)[0]


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
    feeds_qformer_text = True

    def _hub(self, image_embeds, ids, mask):
        return self.proj(run_qformer(self.hub, self.query_tokens, image_embeds, self.text_embeddings, ids, mask))

    def build_prefix(self, backbone, batch):
        img, pooled = self.vision_tokens(backbone, batch["image"])  # frozen ViT, no grad
        b = img.shape[0]
        prompts = list(batch["prompt"])
        demo_rows = self.select(batch, pooled) if self.k else [[] for _ in range(b)]
        flat = [j for row in demo_rows for j in row]
        texts = [self.demo_text(self._pool_rows[j]) for j in flat]
        if self.demo_padding:  # official: one tokenisation of the batch's texts, padded to the longest
            ids, m = backbone.tokenize(prompts + texts, qformer=True, max_length=self.max_text_len)
            q_ids, q_m, d_ids, d_m = ids[:b], m[:b], ids[b:], m[b:]
        else:
            q_ids, q_m = backbone.tokenize(prompts, qformer=True, max_length=self.max_text_len)
            if flat:
                d_ids, d_m = backbone.tokenize(texts, qformer=True, max_length=self.max_text_len)
        query_vis = self._hub(img, q_ids, q_m)[:, : self.nq]  # text-guided visual features
        tails = self.query_tail(backbone, prompts)
        segs: list[list[torch.Tensor]] = [[] for _ in range(b)]
        if flat:
            d_img, _ = self.vision_tokens(backbone, self.demo_images(flat, img.device))
            dfeat = self._hub(d_img, d_ids, d_m)[:, self.nq:]  # visual-guided textual features
            eoc = self.eoc.to(dfeat.dtype)[None]
            for i in range(b):
                for j in range(self.k):
                    r = i * self.k + j
                    feats = dfeat[r] if self.demo_padding else dfeat[r][d_m[r].bool()]
                    segs[i] += [feats, eoc]
        for i in range(b):
            segs[i] += [query_vis[i], tails[i].to(query_vis.dtype)]
        return self.assemble(segs)
