"""Counting scenes of the synthetic world, written in CoOp's classification layout.

Each image holds 1..``max_count`` small objects of one kind (same shape, pattern and colour,
from ``world.sample_object``; placed on a jittered grid by :func:`counting_scene`); its class is the number word ("one", "two", ...), so zero-shot
models score "a photo of a two" and the like, as TVP's CLEVR-counting task does with
number answers. Read back by the ordinary ``image_folder`` data module (``configs/data/synth_count.yaml``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prompttune.data.base import DataError
from prompttune.registry import SYNTHETIC
from prompttune.utils import atomic_write_json


def counting_scene(rng: np.random.Generator, n_objects: int, grid: int = 3, radius: tuple = (0.11, 0.14)) -> list:
    """``n_objects`` copies of one random object (shape, pattern, colour) in distinct cells of a
    ``grid x grid`` layout, jittered inside their cells, so they never touch.

    ``world.sample_scene`` places "small" objects (radius 0.20-0.26 of the side) by rejection and
    rarely fits four on one image; counting needs smaller objects on a grid.
    """
    from prompttune.data.world import sample_object

    if n_objects > grid * grid:
        raise DataError(f"cannot place {n_objects} objects in a {grid}x{grid} grid")
    first = sample_object(rng, size="small")
    cells = rng.choice(grid * grid, size=n_objects, replace=False)
    objs = []
    for c in cells:
        r = float(rng.uniform(*radius))
        half = 0.5 / grid
        slack = max(half - 1.05 * r, 0.0)  # neighbours stay more than r1 + r2 apart
        cx = (int(c) % grid + 0.5) / grid + float(rng.uniform(-slack, slack))
        cy = (int(c) // grid + 0.5) / grid + float(rng.uniform(-slack, slack))
        objs.append(sample_object(rng, category=first.category, subcategory=first.subcategory,
                                  color=first.color, size="small", centre=(cx, cy)))
        objs[-1].radius = r
    return objs


@SYNTHETIC.register("counting")
def write_counting(root: Path, n_train: int = 32, n_val: int = 4, n_test: int = 50, side: int = 32,
                   seed: int = 0, max_count: int = 4, background: str = "plain") -> None:
    """``images/<word>/<split>_NNNN.png`` + ``split_prompttune_count.json`` ([path, label, word] rows)."""
    from prompttune.data.world import NUMBER_WORDS, render, save_png

    if not 1 <= int(max_count) < len(NUMBER_WORDS):
        raise DataError(f"counting max_count must be in [1, {len(NUMBER_WORDS) - 1}], got {max_count}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in range(int(max_count)):
        n_obj = label + 1
        word = NUMBER_WORDS[n_obj]
        (root / "images" / word).mkdir(parents=True, exist_ok=True)
        for s, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for i in range(n):
                objs = counting_scene(rng, n_obj)
                img, _ = render(objs, side, rng, background)
                rel = f"{word}/{s}_{i:04d}.png"
                save_png(root / "images" / rel, img)
                split[s].append([rel, label, word])
    atomic_write_json(root / "split_prompttune_count.json", split)
