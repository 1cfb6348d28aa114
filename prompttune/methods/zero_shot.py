"""Zero-shot CLIP (Radford et al., 2021): classify by cosine similarity to class-name prompts.

As CoOp's zero-shot baselines do (KaiyangZhou/CoOp ``trainers/zsclip.py``):

* class names with ``_`` replaced by a space (zsclip.py:43, 90);
* ``templates: null`` (default): the data config's ``template`` -- CoOp's per-dataset
  ``CUSTOM_TEMPLATES`` (zsclip.py:13-29, e.g. "a photo of a {}, a type of pet.") -- or
  "a photo of a {}." when the data config names none (``ZeroshotCLIP``);
* ``ensemble: true``: prompt ensembling as ``ZeroshotCLIP2`` (zsclip.py:63-96): the 7
  ``IMAGENET_TEMPLATES_SELECT`` (``trainers/imagenet_templates.py:86-94``) plus the dataset's
  template (not added for ImageNet); per template the normalised text features, averaged over
  templates, normalised again;
* ``templates: [...]``: an explicit list (ensembled the same way).

The class text features are computed once in :meth:`setup` and kept as a buffer; images
arrive as cached frozen features. Nothing is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prompttune.backbones.clip import CLIPBackbone
from prompttune.methods.base import Method
from prompttune.registry import METHODS

DEFAULT_TEMPLATE = "a photo of a {}."
# CoOp trainers/imagenet_templates.py IMAGENET_TEMPLATES_SELECT (used by ZeroshotCLIP2)
IMAGENET_TEMPLATES_SELECT = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def prompt_name(classname: str) -> str:
    """A class name as CoOp writes it into a prompt: ``american_bulldog`` -> ``american bulldog``."""
    return classname.replace("_", " ")


@torch.no_grad()
def class_text_features(backbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D]: per template the L2-normalised text features, averaged over templates, normalised."""
    total = 0
    for template in templates:
        texts = [template.format(prompt_name(c)) for c in classnames]
        total = total + F.normalize(backbone.encode_text(backbone.tokenize(texts)).float(), dim=-1)
    return F.normalize(total / len(templates), dim=-1)


def resolve_templates(templates: list[str] | None, ensemble: bool, info: dict) -> list[str]:
    """The templates of a run from the method's keys and the data module's ``info()``."""
    dataset_template = info.get("template")
    if templates:
        base = list(templates)
    elif ensemble:
        base = list(IMAGENET_TEMPLATES_SELECT)
        if dataset_template and info.get("coop_name") != "ImageNet":  # zsclip.py:82-83
            base.append(dataset_template)
        return base
    else:
        base = [dataset_template or DEFAULT_TEMPLATE]
    if ensemble:
        base = list(IMAGENET_TEMPLATES_SELECT) + [t for t in base if t not in IMAGENET_TEMPLATES_SELECT]
    return base


@METHODS.register("zero_shot")
class ZeroShot(Method):
    task = "classification"
    backbone_kind = CLIPBackbone
    consumes = "image_features"
    trains = False

    def __init__(self, templates: list[str] | None = None, ensemble: bool = False):
        super().__init__()
        self.templates = list(templates) if templates else None
        self.ensemble = bool(ensemble)
        self.used_templates: list[str] = []
        self.register_buffer("text_features", torch.empty(0), persistent=False)

    @classmethod
    def check_config(cls, cfg) -> None:
        from prompttune.config import ConfigError

        templates = cfg.method.get("templates")
        if templates is None:
            return
        if isinstance(templates, str) or not all(isinstance(t, str) and "{}" in t for t in templates) \
                or not len(templates):
            raise ConfigError(f"method.templates={templates!r}: expected null (the data config's template) or a "
                              "non-empty list of strings, each with '{}' for the class name")

    def setup(self, backbone, datamodule):
        info = datamodule.info()
        self.used_templates = resolve_templates(self.templates, self.ensemble, info)
        self.text_features = class_text_features(backbone, info["classnames"], self.used_templates)

    def forward(self, backbone, batch):
        img = F.normalize(batch["features"], dim=-1)
        text = self.text_features.to(img.device)
        return {"logits": backbone.logit_scale.float() * img @ text.T}
