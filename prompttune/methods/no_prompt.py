"""Frozen visual in-context learning: no learned prompt (the baseline of Bar et al. and InMeMo).

"Visual Prompting via Image Inpainting" (Bar et al., NeurIPS 2022), Sec. 3 / Fig. 3: the
in-context image, its label and the query fill three cells of a 2x2 canvas; the frozen
MAE-VQGAN inpaints the fourth, and its decoded pixels are the prediction. Nothing is trained
(``trainable_params == 0``, ``optim.epochs: 0``). The in-context pair is chosen by the
datamodule's ``pair`` (``none``: blank support cells, ``random``, ``retrieved``: top-1 image
similarity, InMeMo's setting with ``retriever: timm:vit_large_patch14_clip_224.laion2b``,
``random_same_class``: Bar et al.'s per-episode random same-class support), optionally
``class_matched`` (``prompttune/data/icl_pairs.py``). Canvas: ``prompttune/data/canvas.py``;
metrics ``miou`` and the official ``miou_official``: ``prompttune/tasks/icl_segmentation.py``.
Paper cards: ``experiments/paper/inmemo_pascal5i_noprompt.yaml``, ``inmemo_voc_det_noprompt.yaml``.
"""

from __future__ import annotations

from prompttune.methods._icl import ICLMethod
from prompttune.registry import METHODS


@METHODS.register("no_prompt")
class NoPrompt(ICLMethod):
    trains = False  # evaluation only: method.optim.epochs is 0
    pass
