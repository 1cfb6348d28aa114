"""Shared visual in-context learning (ICL) machinery: the 2x2 canvas, prompters, pair selection.

Used by ``no_prompt``, ``inmemo`` and ``e_inmemo`` (and by the MAE-VQGAN zoo pretraining).

Canvas (Bar et al., "Visual Prompting via Image Inpainting", Fig. 1/3; InMeMo Fig. 2): a square
canvas of ``size`` pixels holds four cells of ``size // 2 - pad`` pixels: the in-context image,
its label, the query and the cell to inpaint. With the official geometry (224 px, pad 1) the
cells are 111 px at offsets 0 and 113, the rest of the canvas is white, and the MAE sees a
14x14 grid of 16-px patches whose masked quadrant is 7x7 tokens (147 kept). Smaller geometries
scale the same rule (64 px, patch 8: cells of 31 px at offsets 0 and 33, an 8x8 grid, 4x4
masked). Pixels are kept in [0, 1] here; the backbone normalises.

Arrangements ``a1``..``a8`` follow InMeMo's ``create_gradiant_grid_images``: which cell holds
which of (support image, support label, query image, query label); the query label's cell is
the masked one. ``a1`` is the default (support image top-left, its label top-right, query
bottom-left, masked bottom-right).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prompttune.methods.base import Method

# cell slots: (row, col) with 0 = near edge, 1 = far edge
TL, TR, BL, BR = (0, 0), (0, 1), (1, 0), (1, 1)
# arrangement -> slots of (support image, support label, query image, query label)
ARRANGEMENTS: dict[str, tuple[tuple[int, int], ...]] = {
    "a1": (TL, TR, BL, BR),
    "a2": (TR, TL, BR, BL),
    "a3": (BR, BL, TR, TL),
    "a4": (BL, BR, TL, TR),
    "a5": (BL, TL, BR, TR),
    "a6": (BR, TR, BL, TL),
    "a7": (TR, BR, TL, BL),
    "a8": (TL, BL, TR, BR),
}
PAIR_CHOICES = ("none", "random", "retrieved")


@dataclass(frozen=True)
class CanvasGeometry:
    """Canvas side, MAE patch size and cell padding; ``size`` must be a multiple of ``2 * patch``."""

    size: int = 224
    patch: int = 16
    pad: int = 1

    def __post_init__(self):
        if self.size % (2 * self.patch):
            raise ValueError(f"canvas size {self.size} must be a multiple of 2 x patch ({2 * self.patch}) "
                             "so that each quadrant is whole patches")
        if not 0 <= self.pad < self.size // 4:
            raise ValueError(f"canvas pad {self.pad} must be in [0, {self.size // 4})")

    @property
    def cell(self) -> int:
        return self.size // 2 - self.pad

    @property
    def far(self) -> int:
        """Offset of the second row/column of cells (113 for 224 px)."""
        return self.size - self.cell

    @property
    def grid(self) -> int:
        return self.size // self.patch

    def origin(self, slot: tuple[int, int]) -> tuple[int, int]:
        return (self.far if slot[0] else 0, self.far if slot[1] else 0)

    def cell_slice(self, slot: tuple[int, int]) -> tuple[slice, slice]:
        y, x = self.origin(slot)
        return slice(y, y + self.cell), slice(x, x + self.cell)

    def token_mask(self, arrangement: str = "a1") -> torch.Tensor:
        """[grid*grid] bool, True on the masked (query-label) quadrant's tokens, row-major."""
        slot = arrangement_slots(arrangement)[3]
        g, h = self.grid, self.grid // 2
        m = torch.zeros(g, g, dtype=torch.bool)
        m[slot[0] * h:(slot[0] + 1) * h, slot[1] * h:(slot[1] + 1) * h] = True
        return m.flatten()


def arrangement_slots(arrangement: str) -> tuple[tuple[int, int], ...]:
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"unknown canvas arrangement {arrangement!r}; valid: {', '.join(ARRANGEMENTS)}")
    return ARRANGEMENTS[arrangement]


def build_canvas(geom: CanvasGeometry, arrangement: str, support_image: torch.Tensor, support_mask: torch.Tensor,
                 query_image: torch.Tensor, query_mask: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """[B, 3, size, size] canvas from four [B, 3, cell, cell] tensors (differentiable in each)."""
    parts = (support_image, support_mask, query_image, query_mask)
    b = support_image.shape[0]
    for name, t in zip(("support_image", "support_mask", "query_image", "query_mask"), parts):
        if t.dim() != 4 or t.shape[1] != 3 or t.shape[-2:] != (geom.cell, geom.cell):
            raise ValueError(f"{name} must be [B, 3, {geom.cell}, {geom.cell}] for a {geom.size}-px canvas, "
                             f"got {list(t.shape)}")
    canvas = support_image.new_full((b, 3, geom.size, geom.size), fill)
    # out-of-place assembly (cat along H/W) keeps autograd simple and avoids in-place on leaves
    rows = []
    slots = arrangement_slots(arrangement)
    by_slot = {s: p for s, p in zip(slots, parts)}
    gap = geom.far - geom.cell
    for r in (0, 1):
        left, right = by_slot[(r, 0)], by_slot[(r, 1)]
        mid = canvas[:, :, :geom.cell, :gap]
        rows.append(torch.cat([left, mid, right], dim=3))
        if r == 0:
            rows.append(canvas[:, :, :gap, :])
    return torch.cat(rows, dim=2)


def quadrant(geom: CanvasGeometry, arrangement: str, canvas: torch.Tensor) -> torch.Tensor:
    """The query-label cell of a canvas: [B, C, cell, cell]."""
    ys, xs = geom.cell_slice(arrangement_slots(arrangement)[3])
    return canvas[..., ys, xs]


# ------------------------------------------------------------------ metric helpers
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def round_to_colors(img01: torch.Tensor, colors=(WHITE, BLACK)) -> torch.Tensor:
    """Official ``round_image``: pixels -> int 0..255 (clip, truncate), then index of the nearest colour.

    ``img01``: [..., 3, H, W] in [0, 1]; returns [..., H, W] long (0 = first colour).
    """
    x = torch.clamp(img01 * 255, 0, 255).int().float()
    opts = torch.tensor(colors, dtype=torch.float32, device=x.device)  # [K, 3]
    d = ((x.unsqueeze(-4) - opts.view(len(colors), 3, 1, 1)) ** 2).mean(dim=-3)  # [..., K, H, W]
    return d.argmin(dim=-3)


def iou_and_acc(pred01: torch.Tensor, target01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image foreground IoU and pixel accuracy, as InMeMo's ``_calc_metric`` computes them.

    Both images are rounded to white/black; foreground is white. An image whose prediction and
    target are both empty scores IoU 1 (the official code divides 0 by 0 there).
    """
    p, t = round_to_colors(pred01) == 0, round_to_colors(target01) == 0
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    acc = (p == t).flatten(1).float().mean(1)
    return iou, acc


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


# ------------------------------------------------------------------ in-context pair selection
def _feature_cache_path(kind: str, paths: list[str], extra: dict) -> Path:
    from prompttune.config import cache_dir

    h = hashlib.sha1()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return cache_dir() / "features" / "icl" / f"{kind}-{h.hexdigest()[:16]}.pt"


def build_retriever(name: str, weights: str | None = None):
    """A frozen image encoder from a backbone config name (``configs/backbone/<name>.yaml``)."""
    from omegaconf import OmegaConf

    from prompttune.config import load_group
    from prompttune.registry import BACKBONES

    cfg = OmegaConf.to_container(OmegaConf.create(load_group("backbone", name)), resolve=True)
    if weights:
        cfg["weights"] = weights
    cls = BACKBONES.get(cfg.pop("name"))
    bb = cls(**cfg)
    if not hasattr(bb, "encode_image"):
        raise ValueError(f"retriever backbone {name!r} ({type(bb).__name__}) has no encode_image")
    return bb


@torch.no_grad()
def image_features(retriever, paths: list[str], retriever_name: str, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised image features, computed once per (retriever, image set) and cached on disk."""
    from prompttune.data.base import ImageTransform, read_image

    size = int(getattr(retriever, "image_size", 224))
    cache = _feature_cache_path("clip", paths, {"retriever": retriever_name, "name": getattr(retriever, "name", ""),
                                               "size": size})
    if cache.is_file():
        feats = torch.load(cache, map_location="cpu", weights_only=True)
        if feats.shape[0] == len(paths):
            return feats
    tf = ImageTransform(size, retriever.mean, retriever.std)
    out = []
    dev = retriever.device
    for i in range(0, len(paths), batch_size):
        x = torch.stack([tf(read_image(p)) for p in paths[i:i + batch_size]]).to(dev)
        out.append(F.normalize(retriever.encode_image(x).float(), dim=-1).cpu())
    feats = torch.cat(out) if out else torch.zeros(0, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(feats, tmp)
    tmp.replace(cache)
    return feats


def select_pairs(strategy: str, query_ids: list[str], query_classes: list[int], pool_ids: list[str],
                 pool_classes: list[int], class_matched: bool, seed: int,
                 query_feats: torch.Tensor | None = None, pool_feats: torch.Tensor | None = None) -> list[int]:
    """Index into the pool of the in-context pair for each query.

    ``random``: a seeded random pool item; ``retrieved``: top-1 cosine similarity (the
    official ``calculate_similariity.py``). Both skip the query image itself; with
    ``class_matched`` only pool items of the query's class are candidates (falling back to the
    whole pool when the class has no other item).
    """
    if strategy not in PAIR_CHOICES:
        raise ValueError(f"unknown in-context pair strategy {strategy!r}; valid: {', '.join(PAIR_CHOICES)}")
    n_pool = len(pool_ids)
    if n_pool == 0:
        raise ValueError("the in-context pool (train split) is empty")
    pool_cls = torch.tensor(pool_classes)
    pool_name = np.array(pool_ids)
    rng = np.random.default_rng(seed)
    sims = None
    if strategy == "retrieved":
        if query_feats is None or pool_feats is None:
            raise ValueError("retrieved pairs need query and pool features")
        sims = query_feats @ pool_feats.T
    out = []
    for i, (qid, qc) in enumerate(zip(query_ids, query_classes)):
        ok = torch.from_numpy(pool_name != qid)
        if class_matched:
            same = ok & (pool_cls == qc)
            ok = same if bool(same.any()) else ok
        if not bool(ok.any()):
            ok = torch.ones(n_pool, dtype=torch.bool)
        if strategy == "retrieved":
            s = sims[i].clone()
            s[~ok] = -float("inf")
            out.append(int(s.argmax()))
        else:  # random (also the placeholder for "none": the dataset blanks the pair)
            cand = torch.nonzero(ok).flatten().numpy()
            out.append(int(cand[rng.integers(len(cand))]))
    return out


# ------------------------------------------------------------------ the shared method
class ICLMethod(Method):
    """Visual ICL over a frozen MAE-VQGAN: builds canvases, predicts codebook indices of the masked cell.

    Subclasses override :meth:`prompt_pair` (identity here: frozen in-context learning).
    The in-context pair of each query comes with the batch (chosen by the datamodule:
    ``data.pair``). ``forward`` returns ``logits`` [B, L, V], ``target`` [B, L] (codebook indices of the
    unprompted label canvas, computed once per (query, pair) and cached), ``token_mask`` [L],
    and in eval mode ``pred_cell`` / ``true_cell`` (decoded pixels of the masked cell and its label).
    """

    task = "icl_segmentation"

    def __init__(self, arrangement: str = "a1", **kw: Any):
        super().__init__()
        if kw:
            raise TypeError(f"unknown {type(self).__name__} option(s): {', '.join(sorted(kw))}")
        arrangement_slots(arrangement)
        self.arrangement = arrangement
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
            return backbone.tokenize(label_canvas)
        keys = [int(k) for k in keys]
        missing = [i for i, k in enumerate(keys) if k not in self._targets]
        if missing:
            tok = backbone.tokenize(label_canvas[missing])
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
            logits = backbone.predict_logits(canvas, token_mask)
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


def save_run_figure(run_dir: str | Path, n: int = 4, name: str = "canvases.png") -> Path:
    """Rebuild a finished ICL run from ``run_dir/config.yaml`` + its checkpoint and save the figure.

    ``python -c "from prompttune.methods._icl import save_run_figure; save_run_figure('runs/X')"``
    """
    import prompttune._tvshim  # noqa: F401
    from omegaconf import OmegaConf

    from prompttune import runs
    from prompttune.utils import torch_load_trusted

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    backbone, dm, method, _ = runs.build(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file() and any(True for _ in method.parameters()):
        try:
            state = torch_load_trusted(ckpt)
        except ValueError:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own Lightning checkpoint
        sd = {k[len("method."):]: v for k, v in state["state_dict"].items() if k.startswith("method.")}
        method.load_state_dict(sd)
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
