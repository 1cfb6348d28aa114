"""The frozen-backbone contract shared by every backbone wrapper."""

from __future__ import annotations

import torch
from torch import nn


class FrozenBackbone(nn.Module):
    """A backbone that is frozen on construction and stays in eval mode.

    Subclasses build their model(s) in ``__init__`` and call :meth:`freeze` last. They
    expose the few hooks methods need (token embeddings, blocks, encoders) and no method
    logic. ``image_size``, ``mean`` and ``std`` describe the pixels the backbone expects;
    data modules read them to build transforms.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    name: str = "backbone"

    def freeze(self) -> "FrozenBackbone":
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> "FrozenBackbone":
        # Frozen backbones never leave eval mode (dropout/BN statistics stay fixed), even
        # when Lightning calls .train() on the whole LightningModule.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def describe(self) -> str:
        return self.name
