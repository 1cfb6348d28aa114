"""The 2x2 visual in-context canvas (geometry, arrangements, assembly), shared by the ICL methods,
the MAE-VQGAN backbone and its zoo pretraining.

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

Lives under ``data/`` (not ``methods/``) because ``backbones/`` and the zoo need it and must not
import methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


__all__ = ["ARRANGEMENTS", "BL", "BR", "CanvasGeometry", "TL", "TR", "arrangement_slots", "build_canvas", "quadrant"]
