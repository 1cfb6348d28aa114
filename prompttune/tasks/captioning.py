"""Captioning: LM loss on the target caption; CIDEr-D and BLEU-4 on generated captions.

Both metrics are written here (pycocoevalcap is not a dependency) and follow the
coco-caption reference implementation: CIDEr-D (Vedantam et al., CVPR 2015, with the
"-D" changes: log document frequency over the evaluated set's references, clipped
candidate counts, Gaussian length penalty with sigma 6, x10) and corpus BLEU-4 (Papineni
et al. 2002, "closest" reference length, coco-caption's smoothing constants). Captions are
lower-cased and stripped of punctuation first (what coco-caption's PTB tokenizer does to
plain English; it is not run here, so contractions are not split).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch

from prompttune.registry import TASKS
from prompttune.tasks.base import Task

_PUNCT = re.compile(r"[^\w\s]")


def caption_tokens(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: list[str], n: int = 4) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i:i + k])] += 1
    return c


def _check(preds: list[str], refs: list[list[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"caption metrics need one reference list per prediction; got {len(preds)} predictions "
                         f"and {len(refs)} reference lists")
    if not preds:
        raise ValueError("caption metrics need at least one prediction")
    for i, r in enumerate(refs):
        if isinstance(r, str) or not len(r):
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {r!r}")


def cider_d(preds: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (coco-caption's ``CiderScorer``), averaged over images."""
    _check(preds, refs)
    cands = [_ngrams(caption_tokens(p), n) for p in preds]
    crefs = [[_ngrams(caption_tokens(r), n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in crefs:
        for ng in set(ng for r in rs for ng in r):
            df[ng] += 1
    ref_len = math.log(float(len(crefs)))

    def vec(cnts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ng, tf in cnts.items():
            k = len(ng) - 1
            v[k][ng] = float(tf) * (ref_len - math.log(max(1.0, df[ng])))
            norm[k] += v[k][ng] ** 2
            if k == 1:  # coco-caption measures length in bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    def sim(vh, vr, nh, nr, lh, lr):
        delta = float(lh - lr)
        val = [0.0] * n
        for k in range(n):
            for ng, x in vh[k].items():
                val[k] += min(x, vr[k].get(ng, 0.0)) * vr[k].get(ng, 0.0)
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for c, rs in zip(cands, crefs):
        vh, nh, lh = vec(c)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            total = [a + b for a, b in zip(total, sim(vh, vr, nh, nr, lh, lr))]
        scores.append(sum(total) / n / len(rs) * 10.0)
    return float(sum(scores) / len(scores))


def bleu(preds: list[str], refs: list[list[str]], n: int = 4) -> float:
    """Corpus BLEU-n with the closest reference length (coco-caption's ``BleuScorer``)."""
    _check(preds, refs)
    tiny, small = 1e-15, 1e-9
    guess, correct = [0] * n, [0] * n
    test_len = ref_len = 0
    for p, rs in zip(preds, refs):
        pw = caption_tokens(p)
        rws = [caption_tokens(r) for r in rs]
        max_ref: Counter = Counter()
        for rw in rws:
            for ng, c in _ngrams(rw, n).items():
                max_ref[ng] = max(max_ref[ng], c)
        for ng, c in _ngrams(pw, n).items():
            correct[len(ng) - 1] += min(c, max_ref[ng])
        for k in range(n):
            guess[k] += max(len(pw) - k, 0)
        test_len += len(pw)
        ref_len += min((abs(len(rw) - len(pw)), len(rw)) for rw in rws)[1]
    score = 1.0
    for k in range(n):
        score *= (correct[k] + tiny) / (guess[k] + small)
    score **= 1.0 / n
    if test_len < ref_len:
        score *= math.exp(1 - ref_len / max(test_len, tiny))
    return float(score)


def gather_lists(*lists: list) -> tuple[list, ...]:
    """All ranks' items (string metrics cannot be summed as tensors, so gather the objects)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return lists
    out = []
    for items in lists:
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, items)
        out.append([x for p in parts for x in p])
    return tuple(out)


class GenerationTask(Task):
    """Shared: the method returns ``{"loss"}`` when training and ``{"predictions"}`` when evaluating."""

    def __init__(self, info: dict[str, Any] | None = None, **cfg: Any):
        super().__init__(info, **cfg)
        self.preds: dict[str, list[str]] = {"val": [], "test": []}
        self.refs: dict[str, list[list[str]]] = {"val": [], "test": []}

    def loss(self, outputs, batch):
        if "loss" not in outputs:
            raise KeyError(f"{type(self).__name__} needs the method's outputs['loss'] (the LM loss); got {sorted(outputs)}")
        return outputs["loss"]

    def update(self, outputs, batch, stage):
        preds, refs = outputs["predictions"], batch["references"]
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions for a batch of {len(refs)}")
        self.preds[stage] += list(preds)
        self.refs[stage] += [list(r) for r in refs]

    def reset(self, stage):
        self.preds[stage], self.refs[stage] = [], []

    def examples(self, stage: str, k: int = 5) -> list[tuple[str, list[str]]]:
        return list(zip(self.preds[stage][:k], self.refs[stage][:k]))


@TASKS.register("captioning")
class CaptioningTask(GenerationTask):
    monitor = "cider"

    def compute(self, stage):
        preds, refs = gather_lists(self.preds[stage], self.refs[stage])
        if not preds:
            return {}
        return {"cider": cider_d(preds, refs), "bleu4": bleu(preds, refs, 4)}
