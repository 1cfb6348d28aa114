"""Captioning: LM loss on the target caption; CIDEr-D and BLEU-4 on generated captions.

The scorers follow coco-caption / pycocoevalcap (``cider/cider_scorer.py``, ``bleu/bleu_scorer.py``):
CIDEr-D (Vedantam et al., CVPR 2015, with the "-D" changes: log document frequency over the
evaluated set's references, clipped candidate counts, Gaussian length penalty with sigma 6,
x10) and corpus BLEU-4 (Papineni et al. 2002, "closest" reference length, coco-caption's
smoothing constants). They score *tokenised* captions, and what the tokenizer does matters
(+6 % CIDEr-D and +13 % BLEU on punctuation-heavy captions when "t-shirt" becomes "t shirt").
``task.tokenizer`` chooses it:

* ``ptb`` -- pycocoevalcap's own ``PTBTokenizer`` (Stanford CoreNLP 3.4.1 run through Java, with
  its punctuation filter): scores equal pycocoevalcap's exactly. Needs the optional extra
  ``pip install 'prompttune[coco-eval]'`` and a ``java`` on PATH;
* ``python`` -- :func:`ptb_tokenize_py`, a re-implementation of that tokenisation for caption
  English (clitics ``'s n't 're``, hyphenated words and decimals kept whole, brackets as
  ``-lrb-``, punctuation dropped); equal to the Java tokenizer on the test corpus of
  ``tests/test_caption_ptb.py``, not on every possible string;
* ``auto`` (default) -- ``ptb`` when pycocoevalcap and Java are available, else ``python``
  (with a warning naming the difference);
* ``simple`` -- the old behaviour (lower case, every non-word character to a space); not
  comparable with published numbers.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import warnings
from collections import Counter
from typing import Any

import torch

from prompttune.registry import TASKS
from prompttune.tasks.base import Task

TOKENIZERS = ("auto", "ptb", "python", "simple")
_PUNCT = re.compile(r"[^\w\s]")
# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after PTB tokenisation. (-lowerCase turns
# -LRB- into -lrb-, so the bracket tokens listed here never match and stay: kept as released.)
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";"}


def caption_tokens(text: str) -> list[str]:
    """``simple`` tokenisation: lower case, every non-word character becomes a space."""
    return _PUNCT.sub(" ", text.lower()).split()


# ---------------------------------------------------------------------------- PTB, in Python
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
                "lemme": ["lem", "me"], "gimme": ["gim", "me"], "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_ABBREV = re.compile(r"^(?:[a-z]\.(?:[a-z]\.)+|[a-z]\.|mr\.|mrs\.|ms\.|dr\.|st\.|jr\.|sr\.|vs\.|etc\.|inc\.|co\.|"
                     r"corp\.|ltd\.|no\.|mt\.|ft\.|ave\.|prof\.)$")
_NUMBER = re.compile(r"^[+-]?\d[\d,.:/]*\d$|^\d$")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_CHUNK = re.compile(r"\d+(?:[,.:]\d+)+|\.\.\.|--|[?!]+|[;,\"`()\[\]{}$%#&@*+=<>|~^]|[^\s;,\"`()\[\]{}$%#&@*+=<>|~^?!]+")


def _ptb_word(w: str) -> list[str]:
    """Split one whitespace/punctuation-free chunk as PTBTokenizer does (caption English)."""
    if w in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[w])
    out_tail: list[str] = []
    # trailing colons, periods and quotes come off, except on abbreviations and numbers
    while w:
        if w.endswith("...") and len(w) > 3:
            out_tail.insert(0, "..."); w = w[:-3]; continue
        if w[-1] == ":" and len(w) > 1:
            out_tail.insert(0, ":"); w = w[:-1]; continue
        if w[-1] == "'" and len(w) > 1 and not re.search(r"[a-z]'[a-z]+'$", w) and not w.endswith("n'"):
            out_tail.insert(0, "'"); w = w[:-1]; continue
        if w[-1] == "." and len(w) > 1 and not _ABBREV.match(w):
            out_tail.insert(0, "."); w = w[:-1]; continue
        break
    head: list[str] = []
    while len(w) > 1 and w[0] in "'" and not w.startswith("'t"):
        head.append("`"); w = w[1:]
    if w.startswith("'t") and w[2:] in ("is", "was"):
        return head + ["'t", w[2:]] + out_tail
    if w in _SPLIT_WORDS:
        return head + list(_SPLIT_WORDS[w]) + out_tail
    if w.count("'") >= 2 and re.fullmatch(r"[a-z]+'n'[a-z]+", w):  # rock'n'roll
        a, _, b = w.split("'")
        return head + [a, "'n'", b] + out_tail
    if w.startswith("y'") and len(w) > 2:  # y'all -> y' all
        return head + ["y'", w[2:]] + out_tail
    m = _CLITIC.match(w)
    if m and not _NUMBER.match(w):
        return head + [m.group(1), m.group(2)] + out_tail
    return head + [w] + out_tail


def ptb_tokenize_py(text: str) -> list[str]:
    """pycocoevalcap's tokenisation (PTBTokenizer -preserveLines -lowerCase, then its punctuation
    filter), re-implemented for caption English. See the module docstring for its reach."""
    text = text.replace("\n", " ").lower()
    tokens: list[str] = []
    for chunk in _CHUNK.findall(text):
        if chunk in _BRACKETS:
            tokens.append(_BRACKETS[chunk])
        elif chunk == '"':
            tokens.append("''")
        elif chunk[0] in "$%#&@*+=<>|~^" and len(chunk) == 1:
            tokens.append(chunk)
        elif chunk in ("...", "--") or set(chunk) <= set("?!;,`"):
            tokens.append(chunk)
        else:
            tokens.extend(_ptb_word(chunk))
    return [t for t in tokens if t not in PTB_PUNCTUATIONS]


@functools.lru_cache(maxsize=1)
def java_ptb_available() -> bool:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


def _ptb_java(captions: list[str]) -> list[list[str]]:
    """Run pycocoevalcap's PTBTokenizer (Java) over all captions in one call."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0].split() for i in range(len(captions))]


def resolve_tokenizer(name: str) -> str:
    if name not in TOKENIZERS:
        raise ValueError(f"task.tokenizer must be one of {', '.join(TOKENIZERS)}, not {name!r}")
    if name == "ptb" and not java_ptb_available():
        raise RuntimeError("task.tokenizer=ptb needs pycocoevalcap (pip install 'prompttune[coco-eval]') and "
                           "a java on PATH; or use task.tokenizer=python (its Python re-implementation)")
    if name == "auto":
        if java_ptb_available():
            return "ptb"
        warnings.warn("caption metrics: pycocoevalcap/Java not available, tokenising with prompttune's Python "
                      "re-implementation of its PTB tokenizer (equal on common captions; install "
                      "'prompttune[coco-eval]' for pycocoevalcap's own)", stacklevel=2)
        return "python"
    return name


def tokenize_captions(captions: list[str], tokenizer: str = "python") -> list[list[str]]:
    """Token lists of ``captions`` with the named tokenizer (``ptb`` batches one Java call)."""
    tokenizer = resolve_tokenizer(tokenizer)
    if tokenizer == "ptb":
        return _ptb_java(captions)
    fn = ptb_tokenize_py if tokenizer == "python" else caption_tokens
    return [fn(c) for c in captions]


def _tokenize_corpus(preds: list[str], refs: list[list[str]], tokenizer: str):
    flat = list(preds) + [r for rs in refs for r in rs]
    toks = tokenize_captions(flat, tokenizer)
    p_toks, i = toks[: len(preds)], len(preds)
    r_toks = []
    for rs in refs:
        r_toks.append(toks[i:i + len(rs)])
        i += len(rs)
    return p_toks, r_toks


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


def cider_d(preds: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0,
            tokenizer: str = "python") -> float:
    """Corpus CIDEr-D (coco-caption's ``CiderScorer``), averaged over images."""
    scores = cider_d_items(preds, refs, n, sigma, tokenizer)
    return float(sum(scores) / len(scores))


def cider_d_items(preds: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0,
                  tokenizer: str = "python") -> list[float]:
    """Each image's CIDEr-D, with document frequencies from the whole corpus (their mean is :func:`cider_d`)."""
    _check(preds, refs)
    p_toks, r_toks = _tokenize_corpus(preds, refs, tokenizer)
    cands = [_ngrams(p, n) for p in p_toks]
    crefs = [[_ngrams(r, n) for r in rs] for rs in r_toks]
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
    return scores


def bleu(preds: list[str], refs: list[list[str]], n: int = 4, tokenizer: str = "python") -> float:
    """Corpus BLEU-n with the closest reference length (coco-caption's ``BleuScorer``)."""
    _check(preds, refs)
    p_toks, r_toks = _tokenize_corpus(preds, refs, tokenizer)
    tiny, small = 1e-15, 1e-9
    guess, correct = [0] * n, [0] * n
    test_len = ref_len = 0
    for pw, rws in zip(p_toks, r_toks):
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
    """``tokenizer``: how captions are tokenised before scoring (``auto | ptb | python | simple``,
    see the module docstring)."""

    monitor = "cider"

    def __init__(self, info: dict[str, Any] | None = None, tokenizer: str = "auto", **cfg: Any):
        super().__init__(info, **cfg)
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"task.tokenizer must be one of {', '.join(TOKENIZERS)}, not {tokenizer!r}")
        self.tokenizer = tokenizer

    def compute(self, stage):
        preds, refs = gather_lists(self.preds[stage], self.refs[stage])
        if not preds:
            return {}
        tok = resolve_tokenizer(self.tokenizer)
        items = cider_d_items(preds, refs, tokenizer=tok)
        if stage == "test":  # per-caption CIDEr-D for paired comparisons (prompttune.stats)
            self.record_items(stage, None, replace=True, cider=items)
        return {"cider": float(sum(items) / len(items)), "bleu4": bleu(preds, refs, 4, tokenizer=tok)}
