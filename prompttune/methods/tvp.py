"""TVP: Transferable Visual Prompting (Zhang et al., "Exploring the Transferability of Visual
Prompting for Multimodal Large Language Models", CVPR 2024, arXiv 2404.11207), and its
baseline, plain visual prompting (``vp``: the same prompt and update with neither FCA nor TSE).

What each part implements (paper section 3; official code ``zycheiheihei/Transferable-Visual-
Prompting``, ``transfer_cls.py``):

* **Prompt** (Sec. 3.1, Eq. 1): one pixel-space perturbation ``delta`` of shape ``[3, S, S]``,
  zero-initialised. The image is resized to ``image_size`` and zero-padded to the canvas
  ``S = canvas_size``; the prompted input is ``normalize(pad(resize(x)) + delta)``. Updates are
  masked to a border frame of width ``prompt_size``, so ``delta`` lives in the frame only.
  Official geometry 224 / 164 / 30; the embedded default scales it to 32 / 24 / 4.
* **Task loss** (Eq. 2): the frozen source model's zero-shot loss on the true class (BLIP-2's
  language-model loss on the class name; CLIP's cross-entropy over its similarity logits),
  through :mod:`prompttune.backbones.scorers`.
* **FCA**, feature consistency alignment (Sec. 3.2, Eq. 4): ``mean_i ||E(x_i + delta) - E(x_i)||_2``,
  the source model's image embedding of the prompted image kept close to that of the clean
  (padded, unprompted) image, so the prompt does not wreck task-agnostic features.
* **TSE**, task semantics enrichment (Sec. 3.3, Eq. 6): ``mean_i s * cos(CLIP_img(x_i + delta),
  CLIP_txt("this is a photo of a {class_i}"))`` with CLIP's logit scale ``s`` clamped at 100,
  from a separate frozen CLIP (``tse_backbone``).
* **Objective and update** (Eq. 7 and the official loop): ``L = task + fca * FCA - tse * TSE``;
  the gradient with respect to ``delta`` (the official code averages the per-sample gradients
  of the repeated noise: the same direction) is L2-normalised over the whole canvas, masked to
  the frame, and subtracted with step ``lr``; ``lr`` follows a cosine over epochs
  (``CosineAnnealingLR(T_max=epochs)`` stepped per epoch).
* **Transfer** (evaluation only, Tables 1-2): ``transfer_targets`` lists backbone configs the trained
  prompt is also scored on at evaluation, zero-shot on the same prompted canvas: the forward's
  ``item_scores`` give each item ``transfer_acc/<target>`` and their mean ``transfer_acc``, which the
  classification task records per item (``test_items.json``) and reports as means
  (``test/transfer_acc``). Training never sees the targets.
* Prompts load and save in the official release's format: ``{"perturbation": float32 [3, S, S]}``
  (:func:`save_prompt`, :func:`load_prompt`).

Departures:

* The data module hands out images already resized to the backbone and normalised; the
  prompter un-normalises them and resizes (bilinear, antialiased) to ``image_size`` on the
  tensor, where the official code resizes the PIL image (bicubic) to 164 directly.
* The source model can be any model with a zero-shot scorer (CLIP or BLIP-2 here); the
  paper's sources are MLLMs (MiniGPT-4, InstructBLIP, BLIP-2, ...).
* The TSE CLIP is any CLIP backbone config (the paper: a separate OpenAI ViT-B/32). TSE on the
  source model itself (``tse_backbone: null``) is refused at compose time unless
  ``tse_on_source: true``, which warns loudly (TVP is then close to VP by construction).
* FCA's clean embedding is computed under ``no_grad`` (the official code builds a graph
  for it that no gradient ever uses).
* A loaded prompt whose centre is not zero is masked to the frame (with a warning): the
  official code never masks the perturbation itself, only its updates.
* The official training transform adds a random flip and crop; here augmentation is the
  data config's ``augment`` switch (off by default, as for every method).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones.scorers import CLIPScorer, ZeroShotScorer, build_scorer, make_scorer, resize_pixels
from prompttune.config import ConfigError
from prompttune.methods.base import Method
from prompttune.registry import METHODS

log = logging.getLogger("prompttune")


# ---------------------------------------------------------------------------- prompt file format
def save_prompt(perturbation: torch.Tensor, path: str | Path) -> None:
    """Save in the official release's format: ``{"perturbation": float32 [3, S, S]}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"perturbation": perturbation.detach().float().cpu().contiguous()}, tmp)
    tmp.replace(path)


def load_prompt(path: str | Path, canvas_size: int | None = None) -> torch.Tensor:
    """Load a prompt file (official format), checking its shape; ``canvas_size`` if given must match."""
    from prompttune.utils import torch_load_trusted

    state = torch_load_trusted(path)
    if not isinstance(state, dict) or "perturbation" not in state:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a TVP prompt: expected a dict with a 'perturbation' tensor "
                         f"of shape [3, S, S], found {keys}")
    p = state["perturbation"]
    if not isinstance(p, torch.Tensor) or p.ndim != 3 or p.shape[0] != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"{path}: 'perturbation' must be a [3, S, S] tensor, got "
                         f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    if canvas_size is not None and p.shape[1] != canvas_size:
        raise ValueError(f"{path}: the prompt is {p.shape[1]}x{p.shape[2]} but this canvas is "
                         f"{canvas_size}x{canvas_size} (canvas_size); train or load a prompt of that size")
    if not torch.isfinite(p).all():
        raise ValueError(f"{path}: 'perturbation' holds non-finite values")
    return p.float()


# ---------------------------------------------------------------------------- the prompter
def frame_geometry(canvas_size: int, image_size: int, prompt_size: int) -> tuple[int, int, int]:
    canvas_size, image_size, prompt_size = int(canvas_size), int(image_size), int(prompt_size)
    if image_size <= 0 or image_size > canvas_size or (canvas_size - image_size) % 2:
        raise ValueError(f"image_size ({image_size}) must be positive, at most canvas_size ({canvas_size}), "
                         "and differ from it by an even number of pixels (zero padding on both sides)")
    if not 0 < prompt_size <= canvas_size // 2:
        raise ValueError(f"prompt_size (the frame width, {prompt_size}) must be in [1, canvas_size/2 = "
                         f"{canvas_size // 2}]")
    return canvas_size, image_size, prompt_size


def frame_mask(canvas_size: int, prompt_size: int) -> torch.Tensor:
    """``[3, S, S]``: 1 on the border frame of width ``prompt_size``, 0 inside."""
    m = torch.ones(3, canvas_size, canvas_size)
    m[:, prompt_size:canvas_size - prompt_size, prompt_size:canvas_size - prompt_size] = 0
    return m


def pad_image(pixels: torch.Tensor, canvas_size: int, image_size: int) -> torch.Tensor:
    """Resize raw pixels to ``image_size`` and zero-pad to ``canvas_size`` (the official 164 -> 224)."""
    pad = (canvas_size - image_size) // 2
    return F.pad(resize_pixels(pixels, image_size), (pad, pad, pad, pad), value=0.0)


def normalized_step(grad: torch.Tensor, mask: torch.Tensor, lr: float) -> torch.Tensor:
    """The official update: ``lr * mask * g / (||g||_2 + 1e-10)`` (norm over the whole canvas)."""
    return lr * mask * grad / (grad.norm() + 1e-10)


@METHODS.register("vp")
class VisualPrompt(Method):
    """Plain visual prompting: a frame perturbation trained on the source's task loss alone."""

    task = "classification"
    consumes = "images"
    manual_optimization = True

    def __init__(self, canvas_size: int | None = None, image_size: int = 24, prompt_size: int = 4,
                 fca: float = 0.0, tse: float = 0.0, tse_backbone: str | dict | None = None,
                 tse_template: str = "this is a photo of a {}", template: str = "a photo of a {}.",
                 checkpoint: str | None = None, tse_on_source: bool = False, tse_weights: str | None = None,
                 transfer_targets: Sequence[str] | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise TypeError(f"unknown {self.registry_name} option(s) {sorted(unknown)}; valid: canvas_size, "
                            "image_size, prompt_size, fca, tse, tse_backbone, tse_template, template, checkpoint, "
                            "tse_on_source, tse_weights, transfer_targets")
        if fca < 0 or tse < 0:
            raise ValueError(f"fca ({fca}) and tse ({tse}) are loss weights and must be >= 0")
        if "{}" not in tse_template:
            raise ValueError(f"tse_template {tse_template!r} must contain '{{}}' for the class name")
        self.image_size, self.prompt_size = int(image_size), int(prompt_size)
        self.fca, self.tse = float(fca), float(tse)
        self.tse_backbone, self.tse_template, self.template = tse_backbone, tse_template, template
        self.checkpoint = checkpoint
        self.tse_on_source, self.tse_weights = bool(tse_on_source), tse_weights
        if isinstance(transfer_targets, str) or not all(isinstance(t, str) for t in (transfer_targets or [])):
            raise ValueError(f"transfer_targets must be a list of backbone config names, got {transfer_targets!r}")
        # evaluation only: target models the trained prompt is also scored on at test time
        self.transfer_targets = list(transfer_targets or [])
        self.canvas_size: int | None = None
        # plain attributes, not submodules: never trained, never checkpointed
        self.classnames: list[str] = []
        self._scorers: dict[str, ZeroShotScorer] = {}
        self._data_norm: tuple[tuple, tuple] | None = None
        if canvas_size is not None:
            self.build(int(canvas_size))

    @classmethod
    def check_config(cls, cfg) -> None:
        m = cfg.method
        for key in ("fca", "tse"):
            v = m.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"method.{key}={v!r}: expected a loss weight >= 0")
        if m.get("tse", 0.0) > 0:
            tse_backbone = m.get("tse_backbone")
            on_source = bool(m.get("tse_on_source", False))
            if tse_backbone is None and not on_source:
                raise ConfigError(
                    f"method.tse={m.tse} with method.tse_backbone=null: TSE would use the source model itself, "
                    "which makes TVP close to VP by construction; the paper uses a separate CLIP ViT-B/32. "
                    "Set method.tse_backbone to a CLIP backbone config (clip_vit_b32; embedded default zoo_clip_s2), "
                    "or method.tse_on_source=true to do it anyway")
            if isinstance(tse_backbone, str) and tse_backbone == (cfg.get("choices") or {}).get("backbone") and not on_source:
                raise ConfigError(
                    f"method.tse_backbone={tse_backbone!r} is the source backbone itself (backbone={tse_backbone!r}): "
                    "TSE needs a separate CLIP; choose another, or set method.tse_on_source=true")
        targets = m.get("transfer_targets") or []
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            raise ConfigError(f"method.transfer_targets={targets!r}: expected a list of backbone config names")
        if targets:
            from prompttune.config import group_choices

            valid = group_choices("backbone")
            bad = [t for t in targets if not isinstance(t, str) or t not in valid]
            if bad:
                raise ConfigError(f"method.transfer_targets names {bad}, not backbone configs; valid: {', '.join(valid)}")
            tse_backbone = m.get("tse_backbone")
            if m.get("tse", 0.0) > 0 and isinstance(tse_backbone, str) and tse_backbone in targets:
                raise ConfigError(f"method.transfer_targets includes the TSE model {tse_backbone!r}: a prompt "
                                  "trained towards it is no test of transfer; choose other targets")
        for key in ("image_size", "prompt_size"):
            v = m.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"method.{key}={v!r}: expected a whole number >= 1")

    # ------------------------------------------------------------------ parameters
    def build(self, canvas_size: int) -> None:
        s, _, p = frame_geometry(canvas_size, self.image_size, self.prompt_size)
        if self.canvas_size == s:
            return
        self.canvas_size = s
        self.perturbation = nn.Parameter(torch.zeros(3, s, s))  # zero init (official)
        self.register_buffer("mask", frame_mask(s, p), persistent=False)
        if self.checkpoint:
            self.load_perturbation(load_prompt(self.checkpoint, s))

    def load_perturbation(self, p: torch.Tensor) -> None:
        if self.canvas_size is None:
            self.build(p.shape[-1])
        if tuple(p.shape) != tuple(self.perturbation.shape):
            raise ValueError(f"prompt of shape {tuple(p.shape)} does not fit this {tuple(self.perturbation.shape)} canvas")
        p = p.to(self.perturbation)
        if bool((p * (1 - self.mask)).abs().max() > 0):
            warnings.warn("the loaded prompt is non-zero inside the frame; masking it to the frame", stacklevel=2)
            p = p * self.mask
        with torch.no_grad():
            self.perturbation.copy_(p)

    # ------------------------------------------------------------------ setup
    def setup(self, backbone: nn.Module, datamodule: Any) -> None:
        info = datamodule.info() if datamodule is not None else {}
        names = info.get("classnames")
        if not names:
            raise ValueError(f"{self.registry_name} needs class names from the data module (info()['classnames'])")
        self.bind(backbone, names, getattr(datamodule, "mean", backbone.mean), getattr(datamodule, "std", backbone.std))

    def bind(self, source: Any, classnames: Sequence[str], data_mean=None, data_std=None) -> None:
        """Attach the frozen source model (and the TSE CLIP), the class names and the data normalisation."""
        self.classnames = list(classnames)
        scorer = make_scorer(source, template=self.template) if not isinstance(source, ZeroShotScorer) else source
        self._scorers["source"] = scorer
        if self.canvas_size is None:
            self.build(int(scorer.image_size))
        self._data_norm = (tuple(data_mean or scorer.mean), tuple(data_std or scorer.std))
        if self.tse > 0 and "tse" not in self._scorers:
            self._scorers["tse"] = self._tse_scorer(source, scorer)
        weights = getattr(source, "weights", None)  # targets follow the source (random in smoke runs)
        for t in self.transfer_targets:
            if f"target:{t}" not in self._scorers:
                self._scorers[f"target:{t}"] = build_scorer(t, weights=weights)

    def _tse_scorer(self, source: Any, scorer: ZeroShotScorer) -> ZeroShotScorer:
        """The TSE CLIP: a separate model (the paper: OpenAI CLIP ViT-B/32, ``transfer_cls.py:286``);
        the source itself only on the explicit ``tse_on_source: true`` opt-in (then TVP ~ VP)."""
        if self.tse_backbone is None:
            if not self.tse_on_source:
                raise ValueError(f"{self.registry_name}: tse={self.tse} needs a separate CLIP for TSE: set "
                                 "tse_backbone to a CLIP backbone config (the paper: clip_vit_b32; embedded "
                                 "default: zoo_clip_s2), or tse_on_source=true to use the source model itself")
            if not isinstance(scorer, CLIPScorer):
                raise ValueError("tse > 0 needs a CLIP: set tse_backbone to a backbone config name "
                                 f"(e.g. zoo_clip_s2); the source {scorer.name!r} is not a CLIP")
            msg = (f"{self.registry_name}: TSE ON THE SOURCE MODEL ({scorer.name}) (tse_on_source=true): the TSE "
                   "gradient then comes from the model being prompted and TVP is close to VP by construction; "
                   "the paper uses a separate CLIP ViT-B/32")
            warnings.warn(msg, stacklevel=3)
            log.warning(msg)
            return scorer
        if isinstance(self.tse_backbone, (ZeroShotScorer, nn.Module)):  # a built model (tests, notebooks)
            tse = make_scorer(self.tse_backbone)
        else:
            # the TSE model follows the source's weights setting (random for smoke runs) unless set
            weights = self.tse_weights or getattr(source, "weights", None)
            tse = build_scorer(self.tse_backbone, weights=weights)
        if not isinstance(tse, CLIPScorer):
            raise ValueError(f"tse_backbone {self.tse_backbone!r} must be a CLIP backbone, got {tse.name!r}")
        return tse

    def scorer(self, which: str = "source") -> ZeroShotScorer:
        if which not in self._scorers:
            raise RuntimeError(f"{self.registry_name}: no {which} model bound; call setup(backbone, datamodule) first")
        return self._scorers[which]

    # ------------------------------------------------------------------ forward
    def raw_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the data module's normalisation: back to raw [0, 1] pixels."""
        mean, std = self._data_norm or ((0.0,) * 3, (1.0,) * 3)
        m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return images * s + m

    def clean(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.canvas_size is None:
            raise RuntimeError(f"{self.registry_name}: the canvas size is unknown; set canvas_size or call setup()")
        return pad_image(pixels, self.canvas_size, self.image_size)

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> prompted raw canvas ``pad(resize(x)) + delta`` (not clamped, as officially)."""
        return self.clean(pixels) + self.perturbation.to(pixels.device)

    def forward(self, backbone: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        if "source" not in self._scorers:
            self.bind(backbone, self.classnames or [], None, None)
        prompted = self.apply(self.raw_pixels(batch["image"]))
        out = {"logits": self.scorer().class_scores(prompted, self.classnames)}
        if self.transfer_targets and not self.training and "label" in batch:
            per = self.transfer_correct(prompted, batch["label"])
            out["item_scores"] = {"transfer_acc": torch.stack(list(per.values())).mean(0),
                                  **{f"transfer_acc/{t}": v for t, v in per.items()}}
        return out

    # ------------------------------------------------------------------ transfer (evaluation only)
    def transfer_correct(self, prompted: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-item correctness of each transfer target's zero-shot prediction on the prompted canvas
        (the paper's transfer protocol: the source's prompt, unchanged, in front of another model)."""
        out = {}
        with torch.no_grad():
            for t in self.transfer_targets:
                sc = self.scorer(f"target:{t}")
                if sc.device != prompted.device:
                    sc.to(prompted.device)
                out[t] = (sc.class_scores(prompted, self.classnames).argmax(-1) == labels).float()
        return out

    # ------------------------------------------------------------------ training
    def objective_terms(self, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 7's terms on a batch of raw pixels, unweighted and differentiable in the prompt:
        ``task``, and ``fca`` / ``tse`` where their weights are > 0."""
        if not self.classnames:
            raise RuntimeError(f"{self.registry_name}: no class names bound; call setup() first")
        src = self.scorer()
        clean = self.clean(pixels)
        prompted = clean + self.perturbation.to(pixels.device)
        terms = {"task": src.task_loss(prompted, labels, self.classnames)}
        if self.fca > 0:
            with torch.no_grad():
                e_clean = src.embed(clean)
            terms["fca"] = (src.embed(prompted) - e_clean).norm(dim=-1).mean()
        if self.tse > 0:
            tse_model = self.scorer("tse")
            if tse_model.device != pixels.device:
                tse_model.to(pixels.device)
            texts = [self.tse_template.format(self.classnames[int(c)]) for c in labels]
            terms["tse"] = tse_model.text_similarity(prompted, texts).mean()
        return terms

    def objective(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 7: ``task + fca * FCA - tse * TSE`` on a batch of raw pixels."""
        terms = self.objective_terms(pixels, labels)
        loss = terms["task"]
        if "fca" in terms:
            loss = loss + self.fca * terms["fca"]
        if "tse" in terms:
            loss = loss - self.tse * terms["tse"]
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    def prompt_step(self, pixels: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, dict]:
        """One official normalised-gradient step on the perturbation; returns the (pre-step) loss."""
        loss, parts = self.objective(pixels, labels)
        (grad,) = torch.autograd.grad(loss, self.perturbation)
        with torch.no_grad():
            self.perturbation.sub_(normalized_step(grad, self.mask.to(grad.device), lr))
        return loss.detach(), parts

    @staticmethod
    def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
        """``CosineAnnealingLR(T_max=epochs)`` stepped per epoch, as the official loop does."""
        return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))

    def manual_step(self, module: Any, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        cfg = module.optim_cfg
        epochs = int(getattr(module.trainer, "max_epochs", None) or cfg.get("epochs", 1))
        lr = self.cosine_lr(float(cfg.get("lr", 1.0)), int(module.current_epoch), epochs)
        loss, parts = self.prompt_step(self.raw_pixels(batch["image"]), batch["label"], lr)
        for k, v in parts.items():
            module.log(f"train/{k}", v, batch_size=len(batch["label"]))
        return loss

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"perturbation": self.perturbation.detach()}

    def save(self, path: str | Path) -> None:
        save_prompt(self.perturbation, path)


@METHODS.register("tvp")
class TransferableVisualPrompt(VisualPrompt):
    """TVP: visual prompting + FCA + TSE (official weights: fca 0.005, tse 0.001)."""

    def __init__(self, fca: float = 0.005, tse: float = 0.001, **kw: Any):
        super().__init__(fca=fca, tse=tse, **kw)
