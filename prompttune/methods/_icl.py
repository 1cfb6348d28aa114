"""Shared visual in-context learning (ICL) machinery: the method base, prompters, the demo figure.

Used by ``no_prompt``, ``inmemo`` and ``e_inmemo``. The 2x2 canvas (geometry, arrangements
a1..a8, assembly) is in ``prompttune/data/canvas.py``; pair selection and retrieval in
``prompttune/data/icl_pairs.py``; the metrics (``miou`` and the official uint8 chain
``miou_official``) in ``prompttune/tasks/icl_segmentation.py``. Pixels are kept in [0, 1] here;
the backbone normalises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The canvas lives in data/canvas.py (backbones and the zoo need it too), the metric helpers with
# the task, pair selection with the data; all re-exported here for existing imports.
from prompttune.data.canvas import (ARRANGEMENTS, BL, BR, TL, TR, CanvasGeometry,  # noqa: F401
                                    arrangement_slots, build_canvas, quadrant)
from prompttune.data.icl_pairs import PAIR_CHOICES, build_retriever, select_pairs  # noqa: F401
from prompttune.methods.base import Method
from prompttune.tasks.icl_segmentation import (BLACK, WHITE, iou_and_acc,  # noqa: F401
                                               official_iou_and_acc, round_to_colors)


# ------------------------------------------------------------------ prompters
class PadPrompter(nn.Module):
    """InMeMo's prompt enhancer (``trainer/visual_prompters.py``): four learnable border strips.

    ``size`` x ``size`` image, border width ``pad``: top/bottom [1,3,pad,size], left/right
    [1,3,size-2*pad,pad], ``torch.randn`` init; ``x + eps * prompt``. The official 224/30 gives
    69,840 parameters. Cells are resized to ``size`` (bilinear), prompted, and resized back.
    """

    def __init__(self, size: int = 224, pad: int = 30, eps: float = 1.0):
        super().__init__()
        if not 0 < 2 * pad < size:
            raise ValueError(f"prompter pad {pad} must satisfy 0 < 2*pad < size ({size})")
        self.size, self.pad, self.eps = int(size), int(pad), float(eps)
        self.pad_up = nn.Parameter(torch.randn(1, 3, pad, size))
        self.pad_down = nn.Parameter(torch.randn(1, 3, pad, size))
        self.pad_left = nn.Parameter(torch.randn(1, 3, size - 2 * pad, pad))
        self.pad_right = nn.Parameter(torch.randn(1, 3, size - 2 * pad, pad))

    def prompt(self) -> torch.Tensor:
        base = self.pad_up.new_zeros(1, 3, self.size - 2 * self.pad, self.size - 2 * self.pad)
        mid = torch.cat([self.pad_left, base, self.pad_right], dim=3)
        return torch.cat([self.pad_up, mid, self.pad_down], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cell = x.shape[-1]
        if cell != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x + self.eps * self.prompt()
        if cell != self.size:
            x = F.interpolate(x, size=(cell, cell), mode="bilinear", align_corners=False)
        return x


# ------------------------------------------------------------------ the shared method
class ICLMethod(Method):
    """Visual ICL over a frozen MAE-VQGAN: builds canvases, predicts codebook indices of the masked cell.

    Subclasses override :meth:`prompt_pair` (identity here: frozen in-context learning).
    The in-context pair of each query comes with the batch (chosen by the datamodule:
    ``data.pair``). ``forward`` returns ``logits`` [B, L, V], ``target`` [B, L] (codebook indices of the
    unprompted label canvas, computed once per (query, pair) and cached), ``token_mask`` [L],
    and in eval mode ``pred_cell`` / ``true_cell`` (decoded pixels of the masked cell and its label).

    Options shared by ``no_prompt``, ``inmemo`` and ``e_inmemo``: ``arrangement`` (a1..a8);
    ``official_target_norm`` (training targets are the VQGAN indices of the *un-normalised*
    label canvas, as InMeMo's ``forward_loss`` computes them: only 33 of 147 masked target tokens
    agree with the normalised ones on the zoo model, per the issue); ``official_train_norm`` (the MAE
    sees un-normalised canvases in training, as InMeMo's training loop; evaluation always
    normalises, as the official evaluation). Both default to false (one input distribution for
    the frozen model, targets the VQGAN was trained for); the paper cards set both true.
    """

    task = "icl_segmentation"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        from prompttune.config import ConfigError

        m, d = cfg.get("method", {}), cfg.get("data", {})
        arr = m.get("arrangement", "a1")
        if arr not in ARRANGEMENTS:
            raise ConfigError(f"method.arrangement={arr!r} is not a canvas arrangement; valid: {', '.join(ARRANGEMENTS)}")
        for key in ("official_target_norm", "official_train_norm"):
            if not isinstance(m.get(key, False), bool):
                raise ConfigError(f"method.{key}={m.get(key)!r} must be true or false")
        if "pair" in d:
            from prompttune.data.icl_pairs import PAIR_CHOICES, SUPPORT_CLASS_CHOICES

            if d.get("pair") not in PAIR_CHOICES:
                raise ConfigError(f"data.pair={d.get('pair')!r}; valid: {', '.join(PAIR_CHOICES)}")
            sc = d.get("support_class", "official")
            if sc not in SUPPORT_CLASS_CHOICES:
                raise ConfigError(f"data.support_class={sc!r}; valid: {', '.join(SUPPORT_CLASS_CHOICES)}")
            vf = d.get("val_fraction", 0.0)
            if not isinstance(vf, (int, float)) or not 0 <= float(vf) < 1:
                raise ConfigError(f"data.val_fraction={vf!r} must be a number in [0, 1)")
            if cfg.get("select", "last") == "val" and not float(vf):
                raise ConfigError("select=val needs a validation split, but data.val_fraction=0: set "
                                  "data.val_fraction (e.g. 0.1: that share of the training images is held out "
                                  "as validation queries; visual ICL datasets have no official validation split)")

    def __init__(self, arrangement: str = "a1", official_target_norm: bool = False,
                 official_train_norm: bool = False, **kw: Any):
        super().__init__()
        if kw:
            raise TypeError(f"unknown {type(self).__name__} option(s): {', '.join(sorted(kw))}")
        arrangement_slots(arrangement)
        self.arrangement = arrangement
        # InMeMo's training loop (train_models.py:183-239): the label canvas reaches the VQGAN
        # un-normalised (washed out) and the prompted canvas reaches the MAE un-normalised
        self.official_target_norm, self.official_train_norm = bool(official_target_norm), bool(official_train_norm)
        self.geom: CanvasGeometry | None = None
        self._targets: dict[int, torch.Tensor] = {}

    # -- setup: geometry from the backbone, pairs from the data -------------------------
    def setup(self, backbone, datamodule) -> None:
        if not (hasattr(backbone, "predict_logits") and hasattr(backbone, "geometry")):
            raise TypeError(f"{type(self).__name__} needs an MAE-VQGAN inpainting backbone (backbone=zoo_mae_vqgan "
                            f"or mae_vqgan_large), not {type(backbone).__name__}")
        self.geom = backbone.geometry
        self.build_prompters(self.geom)
        if not hasattr(datamodule, "prepare_pairs"):
            raise TypeError(f"{type(self).__name__} needs an in-context datamodule (pascal5i, voc_detection), "
                            f"not {type(datamodule).__name__}")
        # the datamodule picks each query's in-context pair (data.pair: none | random | retrieved);
        # its retriever follows the backbone's weights unless data.retriever_weights says otherwise
        datamodule.prepare_pairs(getattr(backbone, "weights", None))

    def build_prompters(self, geom: CanvasGeometry) -> None:
        """Create trainable parameters once the canvas geometry is known."""

    def prompt_pair(self, support_image: torch.Tensor, support_mask: torch.Tensor,
                    query_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return support_image, support_mask, query_image

    # -- forward --------------------------------------------------------------------------
    def _target_tokens(self, backbone, batch, label_canvas: torch.Tensor) -> torch.Tensor:
        keys = batch.get("pair_key")
        if keys is None:
            return backbone.tokenize(label_canvas, self.official_target_norm)
        keys = [int(k) for k in keys]
        missing = [i for i, k in enumerate(keys) if k not in self._targets]
        if missing:
            tok = backbone.tokenize(label_canvas[missing], self.official_target_norm)
            for j, i in enumerate(missing):
                self._targets[keys[i]] = tok[j]  # stays on the device: no host copies per step
        return torch.stack([self._targets[k] for k in keys]).to(label_canvas.device)

    def forward(self, backbone, batch: dict[str, Any]) -> dict[str, Any]:
        if self.geom is None:
            self.geom = backbone.geometry
        g, arr = self.geom, self.arrangement
        s_img, s_mask = batch["support_image"], batch["support_mask"]
        q_img, q_mask = batch["query_image"], batch["query_mask"]
        label_canvas = build_canvas(g, arr, s_img, s_mask, q_img, q_mask)
        with torch.no_grad():
            target = self._target_tokens(backbone, batch, label_canvas)
        ps_img, ps_mask, pq_img = self.prompt_pair(s_img, s_mask, q_img)
        canvas = build_canvas(g, arr, ps_img, ps_mask, pq_img, torch.ones_like(q_mask))
        token_mask = g.token_mask(arr).to(canvas.device)
        needs_grad = self.training and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(needs_grad):
            logits = backbone.predict_logits(canvas, token_mask, normalise=not (self.training and self.official_train_norm))
        out = {"logits": logits, "target": target, "token_mask": token_mask, "canvas": canvas.detach()}
        if not self.training:
            with torch.no_grad():
                pred = backbone.decode_tokens(logits.argmax(-1))
                out["pred_canvas"] = pred
                out["pred_cell"] = quadrant(g, arr, pred)
                out["true_cell"] = quadrant(g, arr, label_canvas)
        return out


# ------------------------------------------------------------------ demo figure
@torch.no_grad()
def save_canvas_figure(path: str | Path, backbone, method: ICLMethod, batch: dict[str, Any], n: int = 4,
                       title: str = "") -> Path:
    """PNG of ``n`` episodes: input canvas (masked cell grey), prediction pasted in, ground truth."""
    from PIL import Image, ImageDraw

    method.eval()
    out = method(backbone, batch)
    g, arr = method.geom, method.arrangement
    canvas = out["canvas"][:n].clone()
    ys, xs = g.cell_slice(arrangement_slots(arr)[3])
    masked = canvas.clone()
    masked[..., ys, xs] = 0.5
    pasted = canvas.clone()
    pasted[..., ys, xs] = out["pred_cell"][:n]
    truth = canvas.clone()
    truth[..., ys, xs] = out["true_cell"][:n]
    iou, _ = iou_and_acc(out["pred_cell"][:n], out["true_cell"][:n])
    rows = []
    sep_v = canvas.new_ones(3, g.size, 2)
    for i in range(canvas.shape[0]):
        rows.append(torch.cat([masked[i], sep_v, pasted[i], sep_v, truth[i]], dim=2))
        rows.append(canvas.new_zeros(3, 2, rows[-1].shape[-1]))  # a black rule between episodes
    grid = torch.cat(rows[:-1], dim=1).clamp(0, 1)
    img = Image.fromarray((grid.permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8))
    scale = max(1, 256 // g.size)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    head = 28
    fig = Image.new("RGB", (img.width, img.height + head), "white")
    fig.paste(img, (0, head))
    d = ImageDraw.Draw(fig)
    d.text((4, 2), (title + "  " if title else "") + "columns: input | prediction | ground truth", fill="black")
    d.text((4, 14), "IoU per row: " + ", ".join(f"{v:.2f}" for v in iou.tolist()), fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)
    return path


def load_method_checkpoint(method: nn.Module, path: str | Path) -> None:
    """Load a run's checkpoint (Lightning ``.ckpt`` with ``method.*`` keys, or a safetensors /
    weights-only state dict of the method) into ``method``. Weights-only: no file is ever
    unpickled, whoever wrote it; anything else is rejected with a message naming the path."""
    from prompttune.utils import torch_load_trusted

    state = torch_load_trusted(path)  # FileNotFoundError / ValueError naming the path
    sd = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    if any(k.startswith("method.") for k in sd):  # a Lightning checkpoint of the whole module
        sd = {k.removeprefix("method."): v for k, v in sd.items() if k.startswith("method.")}
    try:
        method.load_state_dict(sd)
    except RuntimeError as err:
        want = {k: list(v.shape) for k, v in method.state_dict().items()}
        have = {k: list(v.shape) for k, v in sd.items()}
        raise ValueError(f"checkpoint {path} does not fit {type(method).__name__}: it holds {have}, the method "
                         f"expects {want}") from None


def save_run_figure(run_dir: str | Path, n: int = 4, name: str = "canvases.png") -> Path:
    """Rebuild a finished ICL run from ``run_dir/config.yaml`` + its checkpoint and save the figure.

    ``python -c "from prompttune.methods._icl import save_run_figure; save_run_figure('runs/X')"``
    """
    import prompttune._tvshim  # noqa: F401
    from omegaconf import OmegaConf

    from prompttune import runs

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    backbone, dm, method, _ = runs.build(cfg)
    ckpt = next((p for p in (run_dir / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")) if p.is_file()), None)
    if ckpt is not None and any(True for _ in method.parameters()):
        load_method_checkpoint(method, ckpt)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    return save_canvas_figure(run_dir / name, backbone, method, batch, n=n,
                              title=f"{cfg.choices.method} ({dm.pair} pair)")


def save_section_figures(runs_dir: str | Path, n: int = 4) -> list[Path]:
    """``save_run_figure`` for every completed ICL run under ``runs_dir`` (e.g. ``runs/demo/icl``)."""
    out = []
    for res in sorted(Path(runs_dir).glob("*/result.json")):
        rec = json.loads(res.read_text())
        if rec.get("status") == "completed" and rec.get("task") == "icl_segmentation":
            out.append(save_run_figure(res.parent, n=n))
    return out
