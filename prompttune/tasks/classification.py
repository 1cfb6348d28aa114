"""Classification: cross-entropy on ``outputs["logits"]``, top-1 accuracy (micro, as CoOp reports)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from prompttune.registry import TASKS
from prompttune.tasks.base import Task


@TASKS.register("classification")
class ClassificationTask(Task):
    monitor = "acc"

    def __init__(self, info: dict[str, Any] | None = None, label_smoothing: float = 0.0, **cfg: Any):
        super().__init__(info, **cfg)
        n = int(self.info.get("num_classes", 0))
        if n < 2:
            raise ValueError(f"classification needs the data's num_classes (>= 2), got {n}")
        self.num_classes = n
        self.label_smoothing = float(label_smoothing)
        self.acc = torch.nn.ModuleDict({s: MulticlassAccuracy(n, average="micro") for s in ("val", "test")})

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs["logits"].float(), batch["label"], label_smoothing=self.label_smoothing)

    def update(self, outputs, batch, stage):
        """Top-1 accuracy, and any per-item scores the method adds under ``outputs["item_scores"]``
        (name -> [B] tensor, e.g. TVP's ``transfer_acc``): recorded per item beside ``acc`` and
        reported as their mean by :meth:`compute`."""
        self.acc[stage].update(outputs["logits"].float(), batch["label"])
        self.record_items(stage, batch, acc=outputs["logits"].argmax(-1) == batch["label"],
                          **(outputs.get("item_scores") or {}))

    def compute(self, stage):
        out = {"acc": float(self.acc[stage].compute())}
        for name, vals in self.item_scores(stage).items():  # the method's extra per-item scores, as means (this rank's items)
            if name != "acc" and vals:
                out[name] = sum(vals) / len(vals)
        return out

    def reset(self, stage):
        self.acc[stage].reset()
