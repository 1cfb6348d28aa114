"""Linear probe: logistic regression on frozen pooled image features.

CLIP's linear-probe protocol (Radford et al., 2021, Sec. 3.2) fits L-BFGS logistic
regression on frozen features; here the same linear model is trained with the shared
optimiser so that it sits in the same comparison table (same data, budget, logging).
Features are computed once by the module's cache. ``init: zero_shot`` starts the weights
from the class-text features (the "ZS-init" of later work), ``random`` from zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.methods.base import Method
from prompttune.registry import METHODS


@METHODS.register("linear_probe")
class LinearProbe(Method):
    task = "classification"
    consumes = "image_features"

    def __init__(self, normalize: bool = True, init: str = "zeros"):
        super().__init__()
        if init not in ("zeros", "zero_shot"):
            raise ValueError(f"linear_probe.init must be 'zeros' or 'zero_shot', not {init!r}")
        self.normalize, self.init = normalize, init
        self.head: nn.Linear | None = None

    def setup(self, backbone, datamodule):
        info = datamodule.info()
        dim = int(getattr(backbone, "embed_dim"))
        self.head = nn.Linear(dim, info["num_classes"])
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.init == "zero_shot":
            from prompttune.methods.zero_shot import class_text_features, resolve_templates

            # the zero-shot classifier of the same data: its template, class names with '_' -> ' '
            templates = resolve_templates(None, False, info)
            with torch.no_grad():
                self.head.weight.copy_(class_text_features(backbone, info["classnames"], templates) * 10)

    def forward(self, backbone, batch):
        x = batch["features"]
        if self.normalize:
            x = F.normalize(x, dim=-1)
        return {"logits": self.head(x)}
