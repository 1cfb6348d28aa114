"""The method contract: an nn.Module holding only what it trains."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Method(nn.Module):
    """Base class of every prompt-tuning method and baseline.

    * ``task``: the registered task name this method serves by default.
    * ``backbone_kind``: which backbone wrapper class it needs (checked before compute).
    * ``consumes``: ``"images"`` (forward receives pixels) or ``"image_features"``
      (forward receives the frozen backbone's pooled image features, which
      :class:`~prompttune.module.PromptTuningModule` computes once per sample and caches).
    * :meth:`setup` runs once before training with the frozen backbone and the data module
      (prototype initialisation, class-text caching, in-context retrieval, ...).
    * :meth:`forward` receives the backbone (never stored as a submodule, so it is neither
      trained nor checkpointed) and a batch dict; it returns a dict of outputs for the task.
    * :meth:`manual_step`: a method that needs its own update rule (TVP's normalised
      gradient step) overrides it and sets ``manual_optimization = True``.
    """

    task: str = "classification"
    backbone_kind: tuple[type, ...] | type | None = None
    consumes: str = "images"
    manual_optimization: bool = False
    trains: bool = True  # False: a training-free baseline, run with method.optim.epochs=0

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Compose-time checks of this method's own keys (enumerations, ranges, keys that would
        be silently inert together), on the whole resolved config, before any model or data is
        built. Raise :class:`~prompttune.config.ConfigError` naming the key, the value and what
        was expected. The generic keys (optimizer, lr, epochs, batch size, shots, precision)
        are checked centrally in :mod:`prompttune.validation`."""

    def setup(self, backbone: nn.Module, datamodule: Any) -> None:  # noqa: D401 - hook
        """One-off initialisation from the frozen backbone and the training data."""

    def forward(self, backbone: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def manual_step(self, module: Any, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        raise NotImplementedError

    def param_groups(self, cfg: Any) -> list[dict[str, Any]] | None:
        """Optional per-group optimiser settings (e.g. a head with its own weight decay)."""
        return None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}
