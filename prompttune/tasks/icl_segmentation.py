"""Visual in-context segmentation / single-object detection on the 2x2 canvas.

Loss (Bar et al. Sec. 3; InMeMo ``forward_loss``): cross-entropy between the MAE's codebook
logits and the VQGAN indices of the label canvas, averaged over the masked (query-label)
patches. Departure: the official loss is additionally divided by the batch size
(``loss / imgs.shape[0]``); here it is the plain mean (a constant factor; Adam is invariant to it).

Metrics (InMeMo ``calculate_metric`` / ``_calc_metric``): the decoded prediction and the label
are cropped to the query-label cell, each pixel rounded to the nearer of white and black, and
foreground = white. ``miou`` is the per-episode foreground IoU averaged over episodes (the
paper's mIoU; a fraction in result.json, percent in reports), ``acc`` the pixel accuracy. An episode whose prediction and label are both empty
scores IoU 1 (the official code would produce NaN).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.methods._icl import iou_and_acc
from prompttune.registry import TASKS
from prompttune.tasks.base import Task


@TASKS.register("icl_segmentation")
class ICLSegmentationTask(Task):
    monitor = "miou"
    higher_is_better = True

    def __init__(self, info: dict[str, Any] | None = None, **cfg: Any):
        super().__init__(info, **cfg)
        from torchmetrics import MeanMetric

        self.metrics = nn.ModuleDict({
            f"{stage}_": nn.ModuleDict({"miou": MeanMetric(), "acc": MeanMetric()}) for stage in ("val", "test")
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
        iou, acc = iou_and_acc(outputs["pred_cell"], outputs["true_cell"])
        self.metrics[f"{stage}_"]["miou"].update(iou)
        self.metrics[f"{stage}_"]["acc"].update(acc)

    def compute(self, stage: str) -> dict[str, float]:
        m = self.metrics[f"{stage}_"]
        return {k: float(v.compute()) for k, v in m.items()}  # fractions, as every task; reports show percent

    def reset(self, stage: str) -> None:
        for v in self.metrics[f"{stage}_"].values():
            v.reset()
