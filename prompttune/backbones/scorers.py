"""Zero-shot scorers: one small interface through which any vision-language model classifies
images by class *names*, so that a visual prompt trained on one model can be evaluated on
any other (TVP's transfer matrix, issue #7).

A scorer takes **raw pixels** (``[B, 3, H, W]``, nominally in ``[0, 1]``; a prompted image
may leave that range, as in the official TVP code, which never clamps) at any size, and
resizes and normalises them for its own model, so models with different input sizes and
normalisations can score the same prompted canvas.

* :meth:`ZeroShotScorer.class_scores` ``(pixels, classnames) -> [B, C]``: higher is better.
* :meth:`ZeroShotScorer.task_loss`: the source model's task loss (cross-entropy over CLIP's
  similarity logits; BLIP-2's language-model loss on the class name).
* :meth:`ZeroShotScorer.embed`: the model's image embedding, for TVP's feature-consistency term.
* :meth:`CLIPScorer.text_similarity`: CLIP similarity of image i and text i, for TVP's TSE term.

Implemented: :class:`CLIPScorer` (any :class:`~prompttune.backbones.clip.CLIPBackbone`: similarity
to ``"a photo of a {class}."``) and :class:`BLIP2Scorer` (any transformers
``Blip2ForConditionalGeneration``, decoder-only (OPT) or encoder-decoder (Flan-T5) language
model: the log-likelihood of the class name after ``"This is a photo of a"``, averaged over
its tokens, as ``util/blip2_utils.py::model_loglikelihood_for_postfixes`` of the official TVP
code does). :func:`make_scorer` picks the scorer for a backbone; :func:`build_scorer` builds a
backbone from its config name (``configs/backbone/<name>.yaml``) and wraps it.

Departures from the official code: the BLIP-2 scorer prepends a space to the class name for
decoder-only (byte-level BPE) language models, where the official code tokenises the bare
class name after the prompt; the BLIP-2 task loss is the per-sample mean token negative
log-likelihood of the true class name (LAVIS averages over all tokens of the batch).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerError(TypeError):
    pass


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of ``[B, 3, H, W]`` to ``size x size``; a no-op at that size."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
    if pixels.shape[-2:] == (size, size):
        return pixels
    shrink = pixels.shape[-1] > size or pixels.shape[-2] > size
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class ZeroShotScorer:
    """Base class. Holds a reference to a frozen model; never trains it."""

    image_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    name: str = "scorer"

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "ZeroShotScorer":
        raise NotImplementedError

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw pixels at any size -> this model's normalised input."""
        x = resize_pixels(pixels.to(self.device), self.image_size)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def class_scores(self, pixels: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def task_loss(self, pixels: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def accuracy(self, pixels: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                 batch_size: int = 256) -> float:
        correct = 0
        for i in range(0, len(pixels), batch_size):
            scores = self.class_scores(pixels[i:i + batch_size], classnames)
            correct += int((scores.argmax(-1).cpu() == labels[i:i + batch_size].cpu()).sum())
        return correct / max(len(pixels), 1)


def _check_labels(labels: torch.Tensor, n: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise ValueError(f"labels must lie in [0, {n - 1}] for {n} class names, got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


class CLIPScorer(ZeroShotScorer):
    """CLIP zero-shot: ``logit_scale * cos(image, text("a photo of a {class}."))``."""

    def __init__(self, backbone: nn.Module, template: str = "a photo of a {}."):
        if "{}" not in template:
            raise ValueError(f"CLIP scorer template {template!r} must contain '{{}}' for the class name")
        self.backbone, self.template = backbone, template
        self.image_size = int(backbone.image_size)
        self.mean, self.std = tuple(backbone.mean), tuple(backbone.std)
        self.name = getattr(backbone, "name", "clip")
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def to(self, device) -> "CLIPScorer":
        self.backbone.to(device)
        self._text_cache.clear()
        return self

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        # inference-mode tensors (cached during a test loop) cannot enter autograd later: key on the mode
        key = (tuple(texts), str(self.device), torch.is_inference_mode_enabled())
        if key not in self._text_cache:
            feats = self.backbone.encode_text(self.backbone.tokenize(list(texts))).float()
            self._text_cache[key] = F.normalize(feats, dim=-1)
        return self._text_cache[key]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone.encode_image(self.prepare(pixels)).float(), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        # the official TVP code clamps CLIP's logit scale at 100 (log 4.6052)
        return self.backbone.logit_scale.detach().float().clamp(max=100.0)

    def class_scores(self, pixels, classnames):
        txt = self.text_features([self.template.format(c) for c in classnames])
        return self.logit_scale() * self.image_features(pixels) @ txt.T

    def task_loss(self, pixels, labels, classnames):
        _check_labels(labels, len(classnames))
        return F.cross_entropy(self.class_scores(pixels, classnames), labels.to(self.device))

    def embed(self, pixels):
        return self.backbone.encode_image(self.prepare(pixels)).float()

    def text_similarity(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """``[B]``: scaled cosine similarity of image i and text i (TVP's TSE, Eq. 6)."""
        if len(texts) != len(pixels):
            raise ValueError(f"text_similarity needs one text per image: {len(texts)} texts, {len(pixels)} images")
        txt = self.text_features(list(texts))
        return self.logit_scale() * (self.image_features(pixels) * txt).sum(-1)


class BLIP2Scorer(ZeroShotScorer):
    """BLIP-2 (transformers ``Blip2ForConditionalGeneration``): class-name log-likelihood after a prompt.

    ``tokenizer`` is the language model's tokenizer (a callable such that
    ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` gives lists of ids).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, prompt: str = "This is a photo of a",
                 image_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD, normalize: bool = True,
                 name: str = "blip2"):
        for attr in ("vision_model", "qformer", "query_tokens", "language_projection", "language_model"):
            if not hasattr(model, attr):
                raise ScorerError(f"BLIP2Scorer needs a transformers Blip2ForConditionalGeneration; "
                                  f"{type(model).__name__} has no {attr!r}")
        self.model, self.tokenizer, self.prompt, self.normalize = model, tokenizer, prompt, normalize
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean, self.std, self.name = tuple(mean), tuple(std), name
        self.decoder_only = bool(model.config.use_decoder_only_language_model)
        self._ids_cache: dict[str, list[int]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "BLIP2Scorer":
        self.model.to(device)
        return self

    def _ids(self, text: str) -> list[int]:
        if text not in self._ids_cache:
            ids = self.tokenizer([text], add_special_tokens=False)["input_ids"][0]
            ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
            if not ids:
                raise ValueError(f"BLIP-2 tokenizer gave no tokens for {text!r}")
            self._ids_cache[text] = ids
        return self._ids_cache[text]

    def query_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, Q, H_lm]``: the Q-Former's query outputs projected into the language model."""
        out = self.model.get_image_features(pixel_values=self.prepare(pixels))
        return out.pooler_output

    def embed(self, pixels):
        return self.query_embeds(pixels).float()

    def _embed_tokens(self, ids: list[int], batch: int) -> torch.Tensor:
        t = torch.tensor(ids, device=self.device).unsqueeze(0)
        return self.model.language_model.get_input_embeddings()(t).expand(batch, -1, -1)

    def token_loglik(self, pixels: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``[B, C]``: mean (``normalize``) or sum of the class names' token log-probabilities."""
        q = self.query_embeds(pixels)
        bsz = q.shape[0]
        prompt = self._embed_tokens(self._ids(self.prompt), bsz).to(q.dtype)
        lm = self.model.language_model
        out = []
        if self.decoder_only:
            prefix = torch.cat([q, prompt], dim=1)
            for name in classnames:
                ids = self._ids(" " + name)
                post = self._embed_tokens(ids, bsz).to(q.dtype)
                logits = lm(inputs_embeds=torch.cat([prefix, post], dim=1)).logits
                # position t predicts token t+1: the class tokens are predicted by the L-1 .. -2 positions
                lp = logits[:, prefix.shape[1] - 1:-1].float().log_softmax(-1)
                tgt = torch.tensor(ids, device=lp.device).view(1, -1, 1).expand(bsz, -1, 1)
                tok = lp.gather(-1, tgt).squeeze(-1)
                out.append(tok.mean(1) if self.normalize else tok.sum(1))
        else:
            enc_in = torch.cat([q, prompt], dim=1)
            enc = lm.get_encoder()(inputs_embeds=enc_in, return_dict=True)
            for name in classnames:
                ids = self._ids(name)
                labels = torch.tensor(ids, device=q.device).unsqueeze(0).expand(bsz, -1).contiguous()
                logits = lm(encoder_outputs=enc, labels=labels, return_dict=True).logits
                tok = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                out.append(tok.mean(1) if self.normalize else tok.sum(1))
        return torch.stack(out, dim=1)

    def class_scores(self, pixels, classnames):
        return self.token_loglik(pixels, classnames)

    def task_loss(self, pixels, labels, classnames):
        """Language-model loss on the true class name: only its column is computed."""
        _check_labels(labels, len(classnames))
        labels = labels.to(self.device)
        losses = []
        for c in labels.unique().tolist():
            sel = labels == c
            losses.append(-self.token_loglik(pixels[sel.to(pixels.device)], [classnames[c]])[:, 0])
        return torch.cat(losses).mean()


# ---------------------------------------------------------------------------- factories
def _blip2_parts(backbone: Any) -> tuple[nn.Module, Callable] | None:
    """(Blip2ForConditionalGeneration, tokenizer) from a BLIP-2 model or a wrapper around one."""
    cands = [backbone] + [getattr(backbone, a) for a in ("model", "hf_model", "blip2") if hasattr(backbone, a)]
    for m in cands:
        if all(hasattr(m, a) for a in ("vision_model", "qformer", "language_projection", "language_model",
                                       "get_image_features")):
            tok = None
            for holder in (backbone, m):
                tok = tok or getattr(holder, "tokenizer", None)
                proc = getattr(holder, "processor", None)
                tok = tok or getattr(proc, "tokenizer", None)
            if tok is None:
                raise ScorerError(f"{type(backbone).__name__} wraps a BLIP-2 model but exposes no tokenizer "
                                  "(expected a 'tokenizer' or 'processor.tokenizer' attribute)")
            return m, tok
    return None


def make_scorer(backbone: Any, **kw: Any) -> ZeroShotScorer:
    """The zero-shot scorer of a backbone: a backbone's own ``zero_shot_scorer()`` if it has
    one, CLIP by similarity, BLIP-2 by class-name log-likelihood."""
    if isinstance(backbone, ZeroShotScorer):
        return backbone
    if hasattr(backbone, "zero_shot_scorer"):
        return backbone.zero_shot_scorer(**kw)
    from prompttune.backbones.clip import CLIPBackbone

    if isinstance(backbone, CLIPBackbone):
        return CLIPScorer(backbone, **kw)
    parts = _blip2_parts(backbone)
    if parts is not None:
        model, tok = parts
        extra = {k: getattr(backbone, k) for k in ("image_size", "mean", "std", "name") if hasattr(backbone, k)}
        return BLIP2Scorer(model, tok, **{**extra, **kw})
    raise ScorerError(f"no zero-shot scorer for {type(backbone).__name__}; supported: CLIP backbones "
                      "(prompttune.backbones.clip), transformers Blip2ForConditionalGeneration or a wrapper "
                      "exposing one as .model with a .tokenizer, or any object with zero_shot_scorer()")


def build_backbone(choice: str | dict, weights: str | None = None) -> nn.Module:
    """A frozen backbone from a config name (``configs/backbone/<name>.yaml``) or a mapping of its keys."""
    from prompttune.config import ConfigError, load_group
    from prompttune.registry import BACKBONES

    if isinstance(choice, str):
        cfg = load_group("backbone", choice)
    elif isinstance(choice, dict):
        base = load_group("backbone", choice["config"]) if "config" in choice else {}
        cfg = {**base, **{k: v for k, v in choice.items() if k != "config"}}
    else:
        raise ConfigError(f"a model must be a backbone config name or a mapping, not {choice!r}")
    cfg = dict(cfg)
    if weights is not None:
        cfg["weights"] = weights
    name = cfg.pop("name", None)
    if not name:
        raise ConfigError(f"backbone config {choice!r} names no backbone ('name:' key)")
    return BACKBONES.get(name)(**cfg)


def build_scorer(choice: str | dict, weights: str | None = None, **kw: Any) -> ZeroShotScorer:
    return make_scorer(build_backbone(choice, weights), **kw)
