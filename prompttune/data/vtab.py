"""VTAB-1k in the common image-folder + list layout (NOAH / SPT / many PEFT repos).

One task per folder::

    <root>/                     e.g. vtab-1k/cifar
      images/...                (any relative paths)
      train800.txt  val200.txt  train800val200.txt  test.txt     lines: "<relpath> <label>"

``mode: final`` trains on ``train800val200.txt`` and tests on ``test.txt`` (the reported
protocol of VPT and SPT, ``Dataset/VTAB.py:48-49``); ``mode: tune`` trains on ``train800.txt``
and tests on ``val200.txt`` (for hyper-parameter search, VPT's ``tune_vtab.py``);
``mode: holdout`` trains on ``train800.txt``, validates on ``val200.txt`` and tests on
``test.txt`` -- the split for the honest ``select: val`` (choose the epoch on val200, report test). Transforms as the SPT code: ``Resize(size)``
(shorter side, bicubic) + ``CenterCrop(size)``, no augmentation, normalised with the
backbone's mean / std.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import DataError
from prompttune.data.fgvc import ItemsDataModule, read_list_file
from prompttune.registry import DATASETS, SYNTHETIC

# mode -> (train list, test list, validation list or None)
MODES = {"final": ("train800val200.txt", "test.txt", None), "tune": ("train800.txt", "val200.txt", None),
         "holdout": ("train800.txt", "test.txt", "val200.txt")}


@DATASETS.register("vtab")
class VTABDataModule(ItemsDataModule):
    no_val_hint = "use data.mode=holdout (train800 -> select on val200 -> test)"

    # 1,000 training images need not cover every class (e.g. SUN397): classes = max label + 1 over all lists
    every_class_in_train = False

    def __init__(self, root: str, mode: str = "final", synthetic: dict | None = None, **kw: Any):
        super().__init__(root, synthetic, "a VTAB-1k task folder (holding train800val200.txt and test.txt)", **kw)
        if mode not in MODES:
            raise DataError(f"data.mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode

    def check(self) -> None:
        self.prepare_root("VTAB-1k task", "images and train800val200.txt / test.txt lists")
        train_file, test_file, val_file = MODES[self.mode]
        for f in (train_file, test_file, val_file):
            if f and not (self.root / f).is_file():
                raise DataError(f"VTAB-1k list {self.root / f} not found (mode={self.mode!r} needs "
                                f"{', '.join(x for x in MODES[self.mode] if x)}, lines '<relpath> <label>')")
        self.splits = {"train": read_list_file(self.root / train_file, "."),
                       "test": read_list_file(self.root / test_file, ".")}
        if val_file:
            self.splits["val"] = read_list_file(self.root / val_file, ".")
        self._finish_check(f"VTAB-1k task {self.root} (mode {self.mode})")


@SYNTHETIC.register("vtab1k")
def write_vtab(root: Path, n_train: int = 800, n_val: int = 200, n_test: int = 400, side: int = 32, seed: int = 0,
               background: str = "noise") -> None:
    """A VTAB-1k-shaped task from the synthetic world: 16 fine classes, 800 + 200 training, lists."""
    from prompttune.data.world import fine_classes, render, sample_object, save_png

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = fine_classes()
    lists: dict[str, list[str]] = {}
    k = 0
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        rows = []
        for label in rng.permutation(np.arange(n) % len(classes)).tolist():  # balanced, shuffled
            sub, cat = classes[label].split(" ")
            img, _ = render([sample_object(rng, category=cat, subcategory=sub)], side, rng, background)
            rel = f"images/{k:06d}.png"
            k += 1
            save_png(root / rel, img)
            rows.append(f"{rel} {label}")
        lists[split] = rows
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, rows in lists.items():
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
