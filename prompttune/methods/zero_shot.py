"""Zero-shot CLIP (Radford et al., 2021): classify by cosine similarity to class-name prompts.

The class text features (one per class; the mean of the normalised features of all
templates when several are given, as CLIP's prompt ensembling does) are computed once in
:meth:`setup` and kept as a buffer; images arrive as cached frozen features. Nothing is
trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prompttune.backbones.clip import CLIPBackbone
from prompttune.methods.base import Method
from prompttune.registry import METHODS


@torch.no_grad()
def class_text_features(backbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    feats = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        f = F.normalize(backbone.encode_text(backbone.tokenize(texts)).float(), dim=-1).mean(0)
        feats.append(F.normalize(f, dim=-1))
    return torch.stack(feats)


@METHODS.register("zero_shot")
class ZeroShot(Method):
    task = "classification"
    backbone_kind = CLIPBackbone
    consumes = "image_features"

    def __init__(self, templates: list[str] = ("a photo of a {}.",)):
        super().__init__()
        self.templates = list(templates)
        self.register_buffer("text_features", torch.empty(0), persistent=False)

    def setup(self, backbone, datamodule):
        self.text_features = class_text_features(backbone, datamodule.info()["classnames"], self.templates)

    def forward(self, backbone, batch):
        img = F.normalize(batch["features"], dim=-1)
        text = self.text_features.to(img.device)
        return {"logits": backbone.logit_scale.float() * img @ text.T}
