"""Image classification from CoOp-style folders: ``<root>/<image_dir>/...`` + split JSON.

The split file is CoOp's format (``split_zhou_OxfordPets.json`` and friends)::

    {"train": [["class_dir/img.jpg", label, "classname"], ...], "val": [...], "test": [...]}

Few-shot subsets are drawn per (shots, seed) as CoOp does (K per class from train, and
min(K, 4) per class from val), saved under ``<root>/split_fewshot/shot_K-seed_S.json``
and reused on every later run, so all methods of a comparison see the same images.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import DataError, ListDataset, PromptDataModule
from prompttune.registry import DATASETS, SYNTHETIC
from prompttune.utils import atomic_write_json

SPLITS = ("train", "val", "test")
log = logging.getLogger("prompttune")


def read_split_file(path: Path, required: tuple[str, ...] = ("train", "test")) -> dict[str, list]:
    if not path.is_file():
        raise DataError(f"split file not found: {path} (expected CoOp's JSON with train/val/test lists)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"split file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise DataError(f"split file {path} must map {', '.join(map(repr, required))} (and 'val') "
                        "to lists of [path, label, classname]")
    for split, rows in data.items():
        for row in rows[:3]:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], int)):
                raise DataError(f"split file {path}, split {split!r}: rows must be [path, label, classname], got {row!r}")
    return data


def classnames_from_split(data: dict[str, list], path: Path) -> list[str]:
    """Label -> class name, required to agree across splits."""
    names: dict[int, str] = {}
    for split, rows in data.items():
        for _, label, name in rows:
            if names.setdefault(label, name) != name:
                raise DataError(
                    f"split file {path}: label {label} is {names[label]!r} in one split and {name!r} in {split!r}"
                )
    n = max(names) + 1 if names else 0
    missing = [i for i in range(n) if i not in names]
    if missing:
        raise DataError(f"split file {path}: labels {missing[:5]} have no images; labels must be 0..{n - 1}")
    test_labels = {label for _, label, _ in data.get("test", [])}
    train_labels = {label for _, label, _ in data.get("train", [])}
    if test_labels - train_labels:
        raise DataError(f"split file {path}: test classes {sorted(test_labels - train_labels)[:5]} never appear in train")
    return [names[i] for i in range(n)]


def fewshot_rows(rows: list, shots: int, seed: int) -> list:
    by_label: dict[int, list] = defaultdict(list)
    for r in rows:
        by_label[r[1]].append(r)
    rng = np.random.default_rng(seed)
    out = []
    for label in sorted(by_label):
        pool = by_label[label]
        k = min(shots, len(pool))
        out += [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
    return out


@DATASETS.register("image_folder")
class ImageFolderDataModule(PromptDataModule):
    def __init__(self, root: str, split_file: str, image_dir: str = "images", shots: int = 0,
                 fewshot_seed: int | None = None, synthetic: dict | None = None, **kw: Any):
        super().__init__(**kw)
        self.root, self.split_name, self.image_dir = Path(root).expanduser(), split_file, image_dir
        self.shots = int(shots or 0)
        self.fewshot_seed = self.seed if fewshot_seed is None else int(fewshot_seed)
        self.synthetic = dict(synthetic) if synthetic else None
        self.classnames: list[str] = []

    @property
    def split_path(self) -> Path:
        return self.root / self.split_name

    def check(self) -> None:
        self.prepare_root("dataset", f"{self.image_dir}/ and {self.split_name}")
        data = read_split_file(self.split_path)
        self.classnames = classnames_from_split(data, self.split_path)
        image_root = self.root / self.image_dir
        missing = [r[0] for s in data.values() for r in s if not (image_root / r[0]).is_file()]
        if missing:
            raise DataError(
                f"split file {self.split_path} names {len(missing)} missing images under {image_root}, "
                f"e.g. {missing[:3]}"
            )
        self._data = data

    def fewshot_split(self) -> dict[str, list]:
        data = self._data
        if not self.shots:
            return data
        path = self.root / "split_fewshot" / f"shot_{self.shots}-seed_{self.fewshot_seed}.json"
        if path.is_file():
            return read_split_file(path, required=("train",))
        out = dict(data)
        out["train"] = fewshot_rows(data["train"], self.shots, self.fewshot_seed)
        if data.get("val"):
            out["val"] = fewshot_rows(data["val"], min(self.shots, 4), self.fewshot_seed)
        atomic_write_json(path, {"train": out["train"], "val": out.get("val", [])})
        return {"train": out["train"], "val": out.get("val", []), "test": data["test"]}

    def build(self) -> None:
        if not hasattr(self, "_data"):
            self.check()
        split = self.fewshot_split()
        split["test"] = self._data["test"]
        image_root = self.root / self.image_dir
        for name in SPLITS:
            rows = split.get(name) or []
            if rows:
                items = [{"path": str(image_root / p), "label": int(lab)} for p, lab, _ in rows]
                self.datasets[name] = ListDataset(items, self.transform(name), self.on_corrupt)

    def info(self) -> dict[str, Any]:
        return {"classnames": list(self.classnames), "num_classes": len(self.classnames)}


def ensure_synthetic(spec: dict, root: Path) -> None:
    """Write a synthetic-world dataset into ``root`` if it is not there with the same spec."""
    from prompttune.data.world import VERSION

    spec = dict(spec)
    kind = spec.pop("kind")
    marker = root / "prompttune_world.json"
    want = {"kind": kind, "world_version": VERSION, **spec}
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have == want:
            return
        # the marker proves prompttune generated this folder: regenerate it for the new spec
        log.warning("%s was generated with %s; regenerating for %s", root, have, want)
        shutil.rmtree(root)
    elif root.is_dir() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and holds no synthetic-world marker; refusing to write the "
                        f"synthetic dataset there (choose another data.root)")
    writer = SYNTHETIC.get(kind)
    writer(root, **spec)
    atomic_write_json(marker, want)  # written last: a killed generation is redone


@SYNTHETIC.register("classification")
def write_classification(root: Path, n_train: int = 24, n_val: int = 4, n_test: int = 25, side: int = 32,
                         seed: int = 0, background: str = "noise") -> None:
    """Fine-grained classification (16 '<pattern> <shape>' classes) in CoOp's layout."""
    from prompttune.data.world import CATEGORIES, SUBCATEGORIES, fine_classes, render, sample_object, save_png

    root = Path(root)
    classes = fine_classes()
    rng = np.random.default_rng(seed)
    split: dict[str, list] = {s: [] for s in SPLITS}
    for label, cls in enumerate(classes):
        sub, cat = cls.split(" ")
        assert cat in CATEGORIES and sub in SUBCATEGORIES
        folder = root / "images" / cls.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for s, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for i in range(n):
                img, _ = render([sample_object(rng, category=cat, subcategory=sub)], side, rng, background)
                rel = f"{cls.replace(' ', '_')}/{s}_{i:04d}.png"
                save_png(root / "images" / rel, img)
                split[s].append([rel, label, cls])
    atomic_write_json(root / "split_prompttune_world.json", split)
