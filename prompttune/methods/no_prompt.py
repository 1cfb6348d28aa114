"""Frozen visual in-context learning: no learned prompt (the baseline of Bar et al. and InMeMo).

"Visual Prompting via Image Inpainting" (Bar et al., NeurIPS 2022), Sec. 3 / Fig. 3: the
in-context image, its label and the query fill three cells of a 2x2 canvas; the frozen
MAE-VQGAN inpaints the fourth, and its decoded pixels are the prediction. Nothing is trained
(``trainable_params == 0``, ``optim.epochs: 0``). The in-context pair is chosen by the
datamodule's ``pair`` (``none``: blank support cells, ``random``, ``retrieved``: top-1 CLIP
image similarity, InMeMo's setting), optionally ``class_matched``. Canvas code: ``methods/_icl.py``.
"""

from __future__ import annotations

from prompttune.methods._icl import ICLMethod
from prompttune.registry import METHODS


@METHODS.register("no_prompt")
class NoPrompt(ICLMethod):
    pass
