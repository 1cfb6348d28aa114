"""Visual in-context segmentation / single-object detection on the 2x2 canvas.

Loss (Bar et al. Sec. 3; InMeMo ``models_mae.py`` ``forward_loss``): cross-entropy between the
MAE's codebook logits and the VQGAN indices of the label canvas, averaged over the masked
(query-label) patches. Departure: the official loss is additionally divided by the batch size
(``loss / imgs.shape[0]``); here it is the plain mean (a constant factor; Adam is invariant to it).

Metrics, two variants of each (fractions in result.json, percent in reports):

* ``miou`` / ``acc`` -- the correct metric. The decoded prediction and the label, cropped to the
  query-label cell, are turned into integers 0..255 and each pixel is rounded to the nearer of
  white and black (squared distance, averaged over the channels, computed in ordinary integer
  arithmetic); foreground = white. IoU per episode, averaged over episodes. An episode whose
  prediction and label are both empty scores IoU 1.
* ``miou_official`` / ``acc_official`` -- what the published numbers were computed with (Bar et
  al. ``evaluate/evaluate_segmentation.py`` + ``evaluate/segmentation_utils.py``; InMeMo
  ``val_vp_segmentation.py`` + ``trainer/train_models.py:62`` ``round_image``). ``round_image``
  receives ``np.uint8`` arrays, so ``img - 255`` and ``** 2`` wrap modulo 256: a grey level g is
  called white when ``((g+1)^2 mod 256) <= (g^2 mod 256)``, which is wrong for 128 of the 256
  grey levels (e.g. 15 -> white, 240 -> black). The label goes through the same chain (its
  bicubic edges are grey), after the official normalise / de-normalise round trip
  (``(x - mean) / std`` in float32, ``* std + mean`` in float64, ``* 255``, truncation).
  For detection data (``info["kind"] == "detection"``) the rounded prediction is replaced by the
  bounding box of its largest white 8-connected component (``evaluate_detection/box_ops.py``
  ``to_rectangle``), as the official detection evaluation does; ``miou`` never does this.
  Both-empty episodes give NaN (``0 / 0`` in numpy), and the official average
  (``eval_dict[k] += iou / len(ds)``) is then NaN for the whole run: ``miou_official`` keeps that
  behaviour, and ``official_nan_episodes`` counts such episodes so a NaN is explained.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.registry import TASKS
from prompttune.tasks.base import Task

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------ the correct metric
def to_uint8_levels(img01: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> integer levels 0..255 as the official code makes them (clip, then truncate)."""
    return torch.clamp(img01.float() * 255, 0, 255).int()


def round_to_colors(img01: torch.Tensor, colors=(WHITE, BLACK)) -> torch.Tensor:
    """Nearest colour per pixel with ordinary (non-wrapping) arithmetic.

    ``img01``: [..., 3, H, W] in [0, 1]; returns [..., H, W] long (0 = first colour; ties go to
    the first colour, as ``torch.argmin``).
    """
    x = to_uint8_levels(img01).float()
    opts = torch.tensor(colors, dtype=torch.float32, device=x.device)  # [K, 3]
    d = ((x.unsqueeze(-4) - opts.view(len(colors), 3, 1, 1)) ** 2).mean(dim=-3)  # [..., K, H, W]
    return d.argmin(dim=-3)


def _iou(p: torch.Tensor, t: torch.Tensor, both_empty: float) -> tuple[torch.Tensor, torch.Tensor]:
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, both_empty))
    acc = (p == t).flatten(1).float().mean(1)
    return iou, acc


def iou_and_acc(pred01: torch.Tensor, target01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image foreground IoU and pixel accuracy of the correctly rounded cells (both empty: IoU 1)."""
    return _iou(round_to_colors(pred01) == 0, round_to_colors(target01) == 0, 1.0)


# ------------------------------------------------------------------ the official chain
def official_round_white(levels: torch.Tensor) -> torch.Tensor:
    """``round_image(img, [WHITE, BLACK])`` on ``np.uint8`` input: True where the result is white.

    ``levels``: [..., 3, H, W] integers 0..255. The subtraction and the square are done in uint8
    (wrapping modulo 256), then averaged over channels in float; ties go to white (argmin).
    """
    x = levels.to(torch.uint8)
    opts = torch.tensor([WHITE, BLACK], dtype=torch.uint8, device=x.device).view(2, 3, 1, 1)
    d = ((x.unsqueeze(-4) - opts) ** 2).float().mean(dim=-3)  # uint8 ops wrap, as numpy's
    return d.argmin(dim=-3) == 0


def official_label_levels(label01: torch.Tensor) -> torch.Tensor:
    """The label canvas as the official evaluation turns it into uint8: normalised on the device
    in float32 (``val_vp_segmentation.py:132-133``), de-normalised with float64 numpy statistics,
    ``* 255``, clipped, truncated (``train_models.py:51-52``)."""
    m32 = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=label01.device).view(3, 1, 1)
    s32 = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=label01.device).view(3, 1, 1)
    n = (label01.float() - m32) / s32
    m64 = torch.tensor(IMAGENET_MEAN, dtype=torch.float64, device=label01.device).view(3, 1, 1)
    s64 = torch.tensor(IMAGENET_STD, dtype=torch.float64, device=label01.device).view(3, 1, 1)
    return torch.clamp((n.double() * s64 + m64) * 255, 0, 255).int()


def largest_component_box(fg: torch.Tensor) -> torch.Tensor:
    """``to_rectangle``: the filled bounding box of the largest 8-connected foreground component.

    ``fg``: [B, H, W] bool -> [B, H, W] bool (all False where there is no foreground).
    Components are found by propagating the largest pixel index through 3x3 neighbourhoods.
    """
    b, h, w = fg.shape
    idx = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).view(1, 1, h, w).expand(b, 1, h, w)
    lab = torch.where(fg.unsqueeze(1), idx, torch.zeros_like(idx))
    mask = fg.unsqueeze(1)
    while True:
        nxt = torch.where(mask, F.max_pool2d(lab, 3, stride=1, padding=1), torch.zeros_like(lab))
        if torch.equal(nxt, lab):
            break
        lab = nxt
    lab = lab.view(b, h * w).long()
    out = torch.zeros(b, h, w, dtype=torch.bool, device=fg.device)
    for i in range(b):
        ids, counts = torch.unique(lab[i][lab[i] > 0], return_counts=True)
        if not len(ids):
            continue
        comp = (lab[i] == ids[counts.argmax()]).view(h, w)
        ys, xs = torch.nonzero(comp, as_tuple=True)
        out[i, int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1] = True
    return out


def official_iou_and_acc(pred01: torch.Tensor, target01: torch.Tensor,
                         boxes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode IoU (NaN when both are empty) and accuracy of the official uint8 chain."""
    p = official_round_white(to_uint8_levels(pred01))
    t = official_round_white(official_label_levels(target01))
    if boxes:
        p = largest_component_box(p)
    return _iou(p, t, float("nan"))


@TASKS.register("icl_segmentation")
class ICLSegmentationTask(Task):
    monitor = "miou"
    higher_is_better = True
    metric_names = ("miou", "acc", "miou_official", "acc_official", "official_nan_episodes")

    def __init__(self, info: dict[str, Any] | None = None, **cfg: Any):
        super().__init__(info, **cfg)
        from torchmetrics import MeanMetric, SumMetric

        # the official average keeps NaN (nan_strategy="disable"); the correct one never has any
        self.boxes = (info or {}).get("kind") == "detection"
        self.metrics = nn.ModuleDict({
            f"{stage}_": nn.ModuleDict({"miou": MeanMetric(), "acc": MeanMetric(),
                                        "miou_official": MeanMetric(nan_strategy="disable"),
                                        "acc_official": MeanMetric(),
                                        "official_nan_episodes": SumMetric()})
            for stage in ("val", "test")
        })

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits, target, mask = outputs["logits"], outputs["target"], outputs["token_mask"]
        if logits.shape[:2] != target.shape:
            raise ValueError(f"logits {list(logits.shape)} and target tokens {list(target.shape)} disagree")
        if mask.dim() == 1:
            mask = mask.expand_as(target)
        return F.cross_entropy(logits[mask].float(), target[mask])

    def update(self, outputs: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        if "pred_cell" not in outputs:
            raise ValueError("icl_segmentation needs decoded predictions ('pred_cell'); the method ran in train mode")
        m = self.metrics[f"{stage}_"]
        iou, acc = iou_and_acc(outputs["pred_cell"], outputs["true_cell"])
        m["miou"].update(iou)
        m["acc"].update(acc)
        self.record_items(stage, batch, miou=iou, acc=acc)
        o_iou, o_acc = official_iou_and_acc(outputs["pred_cell"], outputs["true_cell"], boxes=self.boxes)
        m["miou_official"].update(o_iou)
        m["acc_official"].update(o_acc)
        m["official_nan_episodes"].update(torch.isnan(o_iou).sum().float())

    def compute(self, stage: str) -> dict[str, float]:
        m = self.metrics[f"{stage}_"]
        return {k: float(v.compute()) for k, v in m.items()}  # fractions, as every task; reports show percent

    def reset(self, stage: str) -> None:
        for v in self.metrics[f"{stage}_"].values():
            v.reset()
