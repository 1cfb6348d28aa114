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
