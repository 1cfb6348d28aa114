"""The synthetic world: seeded, procedurally generated scenes of objects.

Every object has a *category* (its shape), a *sub-category* (its surface pattern: the
fine-grained distinction), and *attributes* (colour, size), and comes with an instance
mask, a box, and a caption. Scenes hold one or several objects (counts). Writers in
``prompttune/data`` store the world in real datasets' on-disk formats, so the real
loaders are what read it.

Fine-grained class names are "<pattern> <shape>" (e.g. "striped disc"): sixteen classes
that share four coarse categories, so that a caption model which learns shapes easily
still has room to learn patterns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

CATEGORIES = ("disc", "square", "triangle", "cross")
SUBCATEGORIES = ("plain", "striped", "checkered", "dotted")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
    "purple": (150, 60, 200), "orange": (240, 140, 30), "white": (235, 235, 235), "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
VERSION = 2  # bump when rendering changes: cached synthetic datasets are regenerated


def fine_classes() -> list[str]:
    return [f"{s} {c}" for c in CATEGORIES for s in SUBCATEGORIES]


@dataclass
class Obj:
    category: str
    subcategory: str
    color: str
    size: str
    cx: float  # centre, in [0, 1]
    cy: float
    radius: float  # in [0, 1] units of the image side
    box: tuple[float, float, float, float] = field(default=(0, 0, 0, 0))  # x0, y0, x1, y1 in pixels

    @property
    def fine_class(self) -> str:
        return f"{self.subcategory} {self.category}"

    def caption(self, with_subcategory: bool = True, with_attributes: bool = True) -> str:
        parts = []
        if with_attributes:
            parts += [self.size, self.color]
        if with_subcategory:
            parts.append(self.subcategory)
        parts.append(self.category)
        return "a " + " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_object(rng: np.random.Generator, category: str | None = None, subcategory: str | None = None,
                  color: str | None = None, size: str | None = None, centre: tuple[float, float] | None = None) -> Obj:
    size = size or SIZES[rng.integers(len(SIZES))]
    radius = float(rng.uniform(0.36, 0.44) if size == "large" else rng.uniform(0.25, 0.31))
    if centre is None:
        lo, hi = radius * 0.85, 1 - radius * 0.85
        centre = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    return Obj(
        category=category or CATEGORIES[rng.integers(len(CATEGORIES))],
        subcategory=subcategory or SUBCATEGORIES[rng.integers(len(SUBCATEGORIES))],
        color=color or list(COLORS)[rng.integers(len(COLORS))],
        size=size, cx=centre[0], cy=centre[1], radius=radius,
    )


def _shape_mask(obj: Obj, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy = (xx - obj.cx) / obj.radius, (yy - obj.cy) / obj.radius
    if obj.category == "disc":
        return dx * dx + dy * dy <= 1.0
    if obj.category == "square":
        return (np.abs(dx) <= 0.8) & (np.abs(dy) <= 0.8)
    if obj.category == "triangle":  # apex up
        return (dy <= 0.8) & (dy >= -1.0 + 1.8 * np.abs(dx) / 1.0) & (np.abs(dx) <= 1.0)
    if obj.category == "cross":
        return ((np.abs(dx) <= 0.95) & (np.abs(dy) <= 0.32)) | ((np.abs(dy) <= 0.95) & (np.abs(dx) <= 0.32))
    raise ValueError(f"unknown category {obj.category!r}; valid: {CATEGORIES}")


def _pattern(obj: Obj, px: np.ndarray, py: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """1 where the pattern shows the object's colour, 0 where it shows a darkened shade."""
    period = max(4.0, obj.radius * side / 1.8)
    phase = rng.uniform(0, period)
    if obj.subcategory == "plain":
        return np.ones_like(px, dtype=np.float32)
    if obj.subcategory == "striped":
        return (((px + py + phase) % period) < period / 2).astype(np.float32)
    if obj.subcategory == "checkered":
        return ((((px + phase) // (period / 2)) + ((py + phase) // (period / 2))) % 2 == 0).astype(np.float32)
    if obj.subcategory == "dotted":
        gx, gy = (px + phase) % period - period / 2, (py + phase) % period - period / 2
        return (gx * gx + gy * gy > (period / 3.2) ** 2).astype(np.float32)
    raise ValueError(f"unknown subcategory {obj.subcategory!r}; valid: {SUBCATEGORIES}")


# Studio tints (additive, used only when asked for): a scene's background can be tinted by the
# studio it was "photographed" in -- the MMICT world's collections (data/coco_captions.py).
STUDIO_TINTS = tuple((r, g, b) for r in (0, 60, 120) for g in (0, 60, 120) for b in (10, 110))


def _background(side: int, rng: np.random.Generator, style: str, tint: tuple | None = None) -> np.ndarray:
    if tint is not None and style != "plain":
        raise ValueError(f"a studio tint needs the 'plain' background, not {style!r}")
    if style == "plain":
        base = rng.uniform(10, 70, size=3)
        if tint is not None:  # the studio's tint, with a little of the random base left
            base = np.asarray(tint, dtype=np.float64) + (base - 40.0) * 0.1
        img = np.broadcast_to(base, (side, side, 3)).astype(np.float32).copy()
    elif style == "gradient":
        a, b = rng.uniform(0, 80, size=3), rng.uniform(0, 80, size=3)
        t = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(a + (b - a) * t, (side, side, 3)).astype(np.float32).copy()
    elif style == "noise":
        img = rng.uniform(0, 90, size=(side, side, 3)).astype(np.float32)
    else:
        raise ValueError(f"unknown background style {style!r}; valid: plain, gradient, noise")
    return img + rng.normal(0, 6, size=img.shape).astype(np.float32)


def render(objs: list[Obj], side: int = 32, rng: np.random.Generator | None = None,
           background: str = "plain", tint: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render objects (painted in order) on a background (``tint``: an RGB studio tint for the
    plain background, e.g. one of :data:`STUDIO_TINTS`; ``None``, the default: no tint).

    Returns the uint8 image [side, side, 3] and instance masks [n, side, side] (bool),
    each mask being what is visible of its object. Sets each object's pixel ``box``.
    """
    rng = rng or np.random.default_rng(0)
    img = _background(side, rng, background, tint)
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    xx, yy = np.meshgrid(coords, coords)
    px, py = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    visible = np.zeros((len(objs), side, side), dtype=bool)
    for i, obj in enumerate(objs):
        mask = _shape_mask(obj, xx, yy)
        pat = _pattern(obj, px, py, side, rng)
        col = np.array(COLORS[obj.color], dtype=np.float32) * rng.uniform(0.85, 1.1)
        shade = col * 0.35
        paint = shade[None, None, :] + (col - shade)[None, None, :] * pat[..., None]
        img[mask] = paint[mask]
        visible[:i][:, mask] = False
        visible[i] = mask
    for obj, m in zip(objs, visible):
        ys, xs = np.nonzero(m)
        obj.box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if len(xs) else (0, 0, 0, 0)
    img = np.clip(img + rng.normal(0, 4, size=img.shape), 0, 255).astype(np.uint8)
    return img, visible


def sample_scene(rng: np.random.Generator, n_objects: int = 1, same_class: bool = True, **fixed) -> list[Obj]:
    """One object, or ``n_objects`` non-overlapping-ish small ones (counting scenes)."""
    if n_objects == 1:
        return [sample_object(rng, **fixed)]
    first = sample_object(rng, size="small", **fixed)
    objs = [first]
    keep = dict(category=first.category, subcategory=first.subcategory, color=first.color) if same_class else {}
    tries = 0
    while len(objs) < n_objects and tries < 200:
        tries += 1
        cand = sample_object(rng, size="small", **keep)
        if all(math.hypot(cand.cx - o.cx, cand.cy - o.cy) > cand.radius + o.radius for o in objs):
            objs.append(cand)
    return objs


def counting_caption(objs: list[Obj]) -> str:
    o = objs[0]
    n = len(objs)
    noun = o.category + ("es" if o.category == "cross" and n > 1 else ("s" if n > 1 else ""))
    return f"{NUMBER_WORDS[n]} {o.color} {o.subcategory} {noun}"


def save_png(path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG", compress_level=1)
