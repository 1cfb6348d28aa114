"""Image-caption pairs in open_clip's CSV format (``filepath<TAB>title``), and its writer."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from prompttune.data.base import DataError, check_folder
from prompttune.registry import SYNTHETIC


def read_caption_csv(path: str | Path, img_key: str = "filepath", caption_key: str = "title",
                     sep: str = "\t") -> list[tuple[str, str]]:
    """Rows of (absolute image path, caption); relative paths are taken from the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file not found: {path} (expected open_clip CSV with columns {img_key}, {caption_key})")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter=sep)
        if not reader.fieldnames or img_key not in reader.fieldnames or caption_key not in reader.fieldnames:
            raise DataError(f"{path}: expected columns {img_key!r} and {caption_key!r}, found {reader.fieldnames}")
        rows = [(str((path.parent / r[img_key]).resolve()), r[caption_key]) for r in reader]
    if not rows:
        raise DataError(f"{path} lists no image-caption pairs")
    return rows


P_ATTRIBUTES = 0.7  # the caption writer's default share of captions naming colour and size


@SYNTHETIC.register("captions")
def write_captions(root: Path, n: int = 6000, side: int = 32, seed: int = 0, p_subcategory: float = 0.5,
                   p_attributes: float = P_ATTRIBUTES, backgrounds: tuple = ("plain", "gradient")) -> None:
    """Pretraining pairs. Captions name the pattern (the fine-grained cue) only with probability
    ``p_subcategory``, so a model trained on them knows shapes well and patterns less well:
    room for prompt tuning on the fine-grained classes."""
    from prompttune.data.world import render, sample_object, save_png

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["filepath\ttitle"]
    for i in range(n):
        obj = sample_object(rng)
        img, _ = render([obj], side, rng, backgrounds[int(rng.integers(len(backgrounds)))])
        rel = f"images/{i:06d}.png"
        save_png(root / rel, img)
        cap = obj.caption(with_subcategory=rng.random() < p_subcategory, with_attributes=rng.random() < p_attributes)
        lines.append(f"{rel}\t{cap}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")


def check_caption_root(root: str | Path) -> Path:
    return check_folder(root, "caption dataset", "images/ and captions.csv")
