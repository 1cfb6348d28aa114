"""InMeMo: "Instruct Me More! Random Prompting for Visual In-Context Learning" (Zhang et al., WACV 2024).

A learnable prompt enhancer is added to the in-context pair before the canvas is built
(Fig. 2; Eq. 1-2: ``x' = x + p`` on the in-context image and its label, the canvas of the
enhanced pair and the query goes through the frozen MAE-VQGAN, and the prompt is trained with
the cross-entropy over the VQGAN indices of the masked cell, Eq. 3). The enhancer is the
official ``PadPrompter``: four border strips (pad 30 on a 224-px image: 69,840 parameters,
``torch.randn`` init, ``p_eps = 1``), applied by resizing each 111-px cell to 224, adding,
and resizing back. The official default mode ``spimg_spmask`` uses ONE prompter for both the
image and the label (``targets: [support_image, support_mask]``); the other official modes are
reachable with ``targets`` (e.g. ``[support_image]``, ``[support_image, query_image]``).

Geometry: ``prompt_size`` / ``pad`` default to the official 224 / 30 scaled to the backbone's
canvas (64-px canvas: 64 / 9). Paper setting: ``experiments/paper/inmemo_pascal5i.yaml`` and
``inmemo_voc_det.yaml`` (Adam, lr 40, wd 0, 100 epochs, batch 32, every value cited there).
Official training conventions, selectable (``ICLMethod``): ``official_target_norm`` (targets
from the un-normalised label canvas) and ``official_train_norm`` (the MAE sees un-normalised
canvases in training); the segmentation card sets both. Remaining departures (one line each in
docs/visual_icl.md): cosine schedule without warm restarts (official CosineAnnealingWarmRestarts
T_0=10, stepped per epoch); the loss is not divided by the batch size; for detection the prompt
is added in [0, 1] pixel space (the official detection code adds it to ImageNet-normalised cells).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prompttune.methods._icl import CanvasGeometry, ICLMethod, PadPrompter
from prompttune.registry import METHODS

TARGETS = ("support_image", "support_mask", "query_image")


def scaled_prompt_geometry(geom: CanvasGeometry, prompt_size: int | None, pad: int | None) -> tuple[int, int]:
    size = int(prompt_size) if prompt_size else geom.size
    return size, int(pad) if pad else max(1, round(30 * size / 224))


@METHODS.register("inmemo")
class InMeMo(ICLMethod):
    def __init__(self, prompt_size: int | None = None, pad: int | None = None, eps: float = 1.0,
                 targets: list[str] | tuple[str, ...] = ("support_image", "support_mask"), **kw: Any):
        super().__init__(**kw)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ValueError(f"inmemo targets {list(targets)} invalid; choose from {', '.join(TARGETS)}")
        self.prompt_size, self.pad, self.eps, self.targets = prompt_size, pad, float(eps), tuple(targets)
        self.prompter: nn.Module | None = None

    def build_prompters(self, geom: CanvasGeometry) -> None:
        if self.prompter is None:
            size, pad = scaled_prompt_geometry(geom, self.prompt_size, self.pad)
            self.prompter = PadPrompter(size, pad, self.eps)

    def prompt_pair(self, support_image, support_mask, query_image):
        if self.prompter is None:
            self.build_prompters(self.geom)
        p = self.prompter
        return (p(support_image) if "support_image" in self.targets else support_image,
                p(support_mask) if "support_mask" in self.targets else support_mask,
                p(query_image) if "query_image" in self.targets else query_image)
