"""Zoo entries ``clip-tiny-s1``, ``clip-tiny-s2``, ``clip-tiny-p8``: clip-tiny's recipe with another
initialisation seed or another vision architecture, so that a prompt trained on one model can be
evaluated on others (TVP's source x target transfer matrix).

All are 32 px models with CLIP's normalisation, pretrained contrastively on the same
synthetic-world caption set, so they differ only in initialisation and architecture.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prompttune import zoo
from prompttune.zoo.clip_tiny import TINY_CLIP, pretrain_clip


def make_clip(init_seed: int = 0, vision: dict | None = None) -> nn.Module:
    """open_clip CLIP of ``TINY_CLIP``'s shape with vision overrides, initialised from ``init_seed``."""
    import open_clip

    cfg = copy.deepcopy(TINY_CLIP)
    cfg["vision_cfg"].update(vision or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return open_clip.CLIP(**cfg)


def _pretrain(model: nn.Module, folder: Path, epochs: int = 4, n: int = 6000, batch_size: int = 200,
              **kw: Any) -> dict[str, Any]:
    # data seed 0: every zoo CLIP sees the same caption set (only init / shape differ); 4 epochs
    # (clip-tiny has 12) keeps each build well inside the zoo's ~3 minute budget
    # the recipe is pinned here (not inherited from pretrain_clip's defaults) so a built v1 stays valid
    return pretrain_clip(model, folder, seed=0, epochs=epochs, n=n, batch_size=batch_size, **kw)


# 4 epochs instead of 12: floors of 5.6x and 4x chance (unmeasured on a full build; docs/zoo.md)
FAMILY_BARS = (
    zoo.Bar("linear_probe_acc", min=0.35, why="ridge probe, 16 fine-grained classes, 24 images each"),
    zoo.Bar("zero_shot_acc", min=0.25, why="'a photo of a {class}' over the 16 fine-grained classes"),
)

EXTRA_CLIPS = {
    "clip-tiny-s1": dict(init_seed=1, vision=None,
                         description="clip-tiny's architecture and data, initialisation seed 1, 4 epochs"),
    "clip-tiny-s2": dict(init_seed=2, vision=None,
                         description="clip-tiny's architecture and data, initialisation seed 2, 4 epochs "
                                     "(TVP's held-out TSE model in the embedded default)"),
    "clip-tiny-p8": dict(init_seed=3, vision=dict(patch_size=8, width=96, layers=3, head_width=32),
                         description="a different vision tower: ViT 3x96, patch 8 @32px; text as clip-tiny; 4 epochs"),
}

for _name, _spec in EXTRA_CLIPS.items():
    zoo.register(zoo.ZooEntry(
        name=_name, backbone="clip", description=f"open_clip CLIP, {_spec['description']}",
        make_model=partial(make_clip, _spec["init_seed"], _spec["vision"]), pretrain=_pretrain, version="1",
        bars=FAMILY_BARS,
    ))
