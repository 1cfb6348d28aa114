"""Shared pieces of the visual-prompt methods (``vpt``, ``spt``) over :class:`ViTBackbone`.

* :func:`prompted_forward` -- VPT's insertion (Jia et al., ECCV 2022, Sec. 3.2, Fig. 2):
  P prompt tokens go after the prefix (CLS) token, after the position embeddings (prompts
  carry no position). Shallow: ``[1, P, D]`` enters the first block only and is carried
  through; deep: ``[L, P, D]``, the prompt slice of the sequence is *replaced* before every
  block i by ``prompts[i]`` (Eq. 5-6). The patch embedding does not depend on the
  prompts and runs under ``no_grad``; the blocks run with grad for the prompts only (their
  weights have ``requires_grad=False``).
* :class:`ClassifierHead` -- the linear head on the pooled feature and the optimiser groups
  of the SPT official code (prompts with ``weight_decay``, the head weight with its own
  ``head_weight_decay``, biases without decay).
* :class:`PrototypeSampler` -- SPT's downstream token prototypes, computed in bounded memory.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn

from prompttune.backbones.vit import ViTBackbone

INIT_TYPES = ("random", "mean_pooling", "max_pooling", "kmeans")


def check_number(node: Any, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, allow_none: bool = False) -> None:
    """Compose-time range check of ``method.<key>`` (when present), as a ConfigError naming key, value and range."""
    from prompttune.config import ConfigError

    if key not in node:
        return
    value = node[key]
    want = ("a whole number" if integer else "a number") + (f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else "") \
        + (f" and {'<' if hi_open else '<='} {hi:g}" if hi is not None else "") + (" (or null)" if allow_none else "")
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and integer:
        ok = float(value).is_integer()
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ConfigError(f"method.{key}={value!r}: expected {want}")


def check_vit(backbone: Any, method: str) -> ViTBackbone:
    if not isinstance(backbone, ViTBackbone):
        raise TypeError(f"{method} needs the 'vit' backbone (a timm ViT), got {type(backbone).__name__}; "
                        "choose e.g. backbone=zoo_vit_mae")
    return backbone


def num_classes_of(datamodule: Any, method: str) -> int:
    info = datamodule.info() if datamodule is not None else {}
    n = int(info.get("num_classes", 0) or 0)
    if n < 2:
        raise ValueError(f"{method} needs the data's num_classes (>= 2) from datamodule.info(), got {info!r}")
    return n


def prompted_forward(backbone: ViTBackbone, images: torch.Tensor, prompts: torch.Tensor, deep: bool,
                     dropout: nn.Module | None = None, pool_prompts: bool = True) -> torch.Tensor:
    """Pooled features [B, D] of the frozen ViT with prompt tokens [L or 1, P, D] inserted."""
    with torch.no_grad():
        x = backbone.embed_tokens(images)
    b, k, p = x.shape[0], backbone.num_prefix_tokens, prompts.shape[1]
    drop = dropout if dropout is not None else (lambda t: t)

    def batch_prompts(i: int) -> torch.Tensor:
        # dropout *after* expand: one mask per sample, as VPT's `prompt_dropout(... .expand(B, -1, -1))`
        # (src/models/vit_prompt/vit.py:82,114); before expand the whole batch would share one mask
        return drop(prompts[i].to(x.dtype).expand(b, -1, -1))

    x = torch.cat([x[:, :k], batch_prompts(0), x[:, k:]], dim=1)
    for i, blk in enumerate(backbone.blocks):
        if deep and i > 0:
            x = torch.cat([x[:, :k], batch_prompts(i), x[:, k + p:]], dim=1)
        x = blk(x)
    return backbone.pool_tokens(x, skip=0 if pool_prompts else p)


class ClassifierHead(nn.Linear):
    """Linear head, ``trunc_normal(std)`` weights and zero bias. SPT: std 0.02 for MAE and supervised
    backbones (``train_MAE.py:273``, ``train.py:250``), 0.01 for MoCo-v3 (``train_MoCo.py:260``)."""

    def __init__(self, dim: int, num_classes: int, std: float = 0.02):
        super().__init__(dim, num_classes)
        nn.init.trunc_normal_(self.weight, std=float(std))
        nn.init.zeros_(self.bias)


def head_param_groups(prompts: list[nn.Parameter], head: nn.Linear, cfg: Any,
                      head_weight_decay: float | None) -> list[dict[str, Any]]:
    wd = float((cfg or {}).get("weight_decay", 0.0))
    hwd = wd if head_weight_decay is None else float(head_weight_decay)
    groups = [{"params": [p for p in prompts if p.requires_grad], "weight_decay": wd},
              {"params": [head.weight], "weight_decay": hwd},
              {"params": [head.bias], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------ prototypes (SPT)
class RandomSubset:
    """A uniform sample without replacement of ``k`` rows from a stream of [M, D] chunks.

    Every row gets an independent uniform key; the rows with the ``k`` smallest keys seen
    so far are kept. Equal in distribution to SPT's ``argsort(rand(L))[:k]`` over all rows
    at once, in O(k·D) memory.
    """

    def __init__(self, k: int, generator: torch.Generator):
        self.k, self.g = int(k), generator
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).float().cpu()
        keys = torch.rand(rows.shape[0], generator=self.g)
        self.seen += rows.shape[0]
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.k:
            idx = keys.topk(self.k, largest=False).indices
            rows, keys = rows[idx], keys[idx]
        self.rows, self.keys = rows, keys

    def result(self) -> torch.Tensor:
        if self.rows is None:
            raise ValueError("no tokens were seen: the training data is empty")
        return self.rows[self.keys.argsort()]


def window_pool(tokens: torch.Tensor, num_prompts: int, kind: str) -> torch.Tensor:
    """SPT's mean/max pooling: [B, N, D] -> [B * P, D] window summaries per image.

    As the official ``prompt_generator``: window ``w = N // (P - 1)``; P - 1 windows of w
    consecutive tokens, plus one over the last ``N % w`` tokens (all N tokens when that is
    0, as the official ``x[:, -0:]`` slice does).
    """
    b, n, d = tokens.shape
    reduce = (lambda t: t.mean(dim=1)) if kind == "mean_pooling" else (lambda t: t.amax(dim=1))
    if num_prompts == 1:
        return reduce(tokens)
    w = n // (num_prompts - 1)
    if w < 1:
        raise ValueError(f"{kind} needs num_prompts - 1 <= tokens per image ({n}); got num_prompts={num_prompts}")
    out = [reduce(tokens[:, j * w:(j + 1) * w]) for j in range(num_prompts - 1)]
    rem = n % w
    out.append(reduce(tokens[:, n - rem:] if rem else tokens))
    return torch.stack(out, dim=1).reshape(-1, d)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (squared Euclidean), [M, D] -> [k, D] centres."""
    m = x.shape[0]
    if m < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {m}; raise init_images")
    centres = [x[torch.randint(m, (1,), generator=generator)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / m)
        nxt = x[torch.multinomial(probs, 1, generator=generator)].squeeze(0)
        centres.append(nxt)
        d2 = torch.minimum(d2, ((x - nxt) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        new = new / counts.clamp(min=1)[:, None]
        new[empty] = c[empty]  # an empty cluster keeps its centre
        if torch.allclose(new, c):
            break
        c = new
    return c


class PrototypeSampler:
    """SPT's prompt initialisation from the frozen backbone's tokens on the training data.

    ``layers``: which layers' tokens to use (0 = patch embeddings, i = output of block i-1);
    one prompt set of P rows per layer. Streams the data in batches and keeps, per layer,
    only a bounded random subset (``RandomSubset``): P rows for ``random`` / pooling, and
    ``kmeans_samples`` rows for ``kmeans`` (clustered at the end). At most ``max_images``
    training images are read.
    """

    def __init__(self, init_type: str, num_prompts: int, layers: list[int], max_images: int = 1024,
                 kmeans_samples: int = 4096, kmeans_iters: int = 30, seed: int = 0):
        if init_type not in INIT_TYPES:
            raise ValueError(f"spt init_type must be one of {', '.join(INIT_TYPES)}, not {init_type!r}")
        if max_images < 1:
            raise ValueError(f"spt init_images must be >= 1, got {max_images}")
        self.init_type, self.p, self.layers = init_type, int(num_prompts), list(layers)
        self.max_images, self.iters = int(max_images), int(kmeans_iters)
        self.g = torch.Generator().manual_seed(int(seed))
        keep = max(int(kmeans_samples), self.p) if init_type == "kmeans" else self.p
        self.subsets = {i: RandomSubset(keep, self.g) for i in self.layers}
        self.images = 0

    def add(self, layer_tokens: dict[int, torch.Tensor]) -> None:
        for i in self.layers:
            t = layer_tokens[i]
            if self.init_type in ("mean_pooling", "max_pooling"):
                t = window_pool(t, self.p, self.init_type)
            self.subsets[i].add(t)

    @torch.no_grad()
    def run(self, backbone: ViTBackbone, batches: Iterator[dict[str, Any]]) -> torch.Tensor:
        for batch in batches:
            images = batch["image"]
            room = self.max_images - self.images
            if room <= 0:
                break
            images = images[:room].to(backbone.device, non_blocking=True)
            self.add(backbone.layer_tokens(images, self.layers))
            self.images += images.shape[0]
        return self.result()

    def result(self) -> torch.Tensor:
        out = []
        for i in self.layers:
            rows = self.subsets[i].result()
            if self.init_type == "kmeans":
                rows = kmeans(rows, self.p, self.iters, self.g)
            elif rows.shape[0] < self.p:
                raise ValueError(f"only {rows.shape[0]} candidate tokens at layer {i} for {self.p} prompts; "
                                 "raise spt.init_images or lower num_prompts")
            out.append(rows)
        return torch.stack(out)  # [n_layers, P, D]


def vpt_uniform_(t: torch.Tensor, patch_size: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """VPT's prompt init: U(-v, v), v = sqrt(6 / (3 * patch * patch + D)) (Xavier over the patch projection)."""
    v = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
    with torch.no_grad():
        return t.uniform_(-v, v, generator=generator)
