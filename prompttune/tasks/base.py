"""The task contract: loss, metrics and evaluation protocol for a kind of output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Task(nn.Module):
    """A task turns method outputs and a batch into a loss and metrics.

    Metrics are torchmetrics objects (so DDP synchronises them); ``metric_names`` lists
    what :meth:`compute` returns, ``monitor`` the one to select on. A task is an
    ``nn.Module`` only so that its metric states move with the LightningModule; it holds
    no trainable parameters.
    """

    monitor: str = "acc"
    higher_is_better: bool = True

    def __init__(self, info: dict[str, Any] | None = None, **cfg: Any):
        super().__init__()
        self.info = info or {}
        self.cfg = cfg

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def update(self, outputs: dict[str, Any], batch: dict[str, Any], stage: str) -> None:
        raise NotImplementedError

    def compute(self, stage: str) -> dict[str, float]:
        raise NotImplementedError

    def reset(self, stage: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ per-item scores
    # Each test item's own score (correct or not, IoU, CIDEr, recall hits), so that two methods
    # can be compared *paired* on the same items with a bootstrap CI (prompttune.stats). The mean
    # of a metric's per-item scores is the metric. Runs write them to ``test_items.json``.
    def record_items(self, stage: str, batch: dict[str, Any] | None = None, replace: bool = False,
                     **scores: Any) -> None:
        """Add per-item scores of ``stage`` (this rank's batch), or, with ``replace``, set those of the
        whole split (computed from already gathered state); ``batch["index"]`` names the items."""
        stores = self.__dict__.setdefault("_item_store", {})
        if replace or stage not in stores:
            stores[stage] = {"index": [], "scores": {}, "whole_split": replace}
        store = stores[stage]
        n = None
        for name, v in scores.items():
            vals = [float(x) for x in (v.detach().float().cpu().reshape(-1).tolist() if torch.is_tensor(v) else v)]
            store["scores"].setdefault(name, []).extend(vals)
            n = len(vals)
        index = (batch or {}).get("index")
        if index is not None and n is not None:
            ids = index.detach().cpu().reshape(-1).tolist() if torch.is_tensor(index) else list(index)
            store["index"].extend(int(i) for i in ids[:n])

    def item_scores(self, stage: str) -> dict[str, list[float]]:
        """This rank's per-item scores of ``stage`` recorded so far (not forgotten; see :meth:`take_items`)."""
        return self.__dict__.get("_item_store", {}).get(stage, {}).get("scores", {})

    def take_items(self, stage: str) -> dict[str, Any] | None:
        """The per-item scores recorded since the last call (None when the task records none), then forgets them."""
        store = self.__dict__.setdefault("_item_store", {}).pop(stage, None)
        if not store or not store["scores"]:
            return None
        from prompttune.tasks.captioning import gather_lists  # all ranks' items under DDP

        parts = (store["index"], *store["scores"].values())
        index, *cols = parts if store["whole_split"] else gather_lists(*parts)
        scores = dict(zip(store["scores"], cols))
        n = len(cols[0])
        return {"n": n, "index": index if len(index) == n else None, "scores": scores}
