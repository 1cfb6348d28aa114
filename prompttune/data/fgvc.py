"""FGVC: the five fine-grained benchmarks of VPT / SPT, read in their own folder layouts.

``layout`` (``auto`` detects it from the files present under ``root``):

* ``cub`` -- CUB-200-2011 and NABirds (same format): ``images/``, ``images.txt``
  (``<id> <relpath>``), ``image_class_labels.txt`` (``<id> <class id>``),
  ``train_test_split.txt`` (``<id> <1 train | 0 test>``), optional ``classes.txt``.
  Class ids are mapped, sorted, to 0..C-1 (NABirds' ids are not contiguous: 555 classes).
* ``flowers`` -- Oxford Flowers-102: ``jpg/image_%05d.jpg``, ``imagelabels.mat``,
  ``setid.mat`` (``trnid`` / ``valid`` / ``tstid``).
* ``dogs`` -- Stanford Dogs: ``Images/<synset-breed>/...``, ``lists/train_list.mat``,
  ``lists/test_list.mat`` (``file_list``, ``labels`` 1..120).
* ``cars`` -- Stanford Cars: ``cars_train/``, ``cars_test/``, ``devkit/cars_train_annos.mat``,
  ``devkit/cars_test_annos_withlabels.mat`` (``annotations``: ``fname``, ``class``),
  optional ``devkit/cars_meta.mat``.
* ``vpt_json`` -- VPT's prepared splits: ``train.json`` / ``val.json`` / ``test.json``
  mapping ``relpath -> label`` (images under ``image_dir``: VPT's ``get_imagedir``,
  ``src/data/datasets/json_dataset.py:126-173``: ``images`` for CUB and NABirds, ``Images``
  for Dogs, the dataset folder itself (``.``) for Cars and Flowers). Labels are remapped to
  0..C-1 in sorted order of the ids, as VPT does (``json_dataset.py:59-66``; NABirds' ids are
  sparse); VPT maps each split by its own ids, here every split uses the training split's map
  (the same when every split holds every class) and an id absent from training is an error.
* ``list`` -- SPT's lists: ``train_list`` / ``test_list`` text files of ``relpath label``.

The ``.mat`` layouts need scipy (``pip install "prompttune[fgvc]"`` or ``pip install scipy``), imported only for them.

Transforms: SPT's FGVC protocol by default: train ``RandomResizedCrop(size)`` + horizontal
flip when ``augment`` is on; evaluation (and training without augmentation)
``Resize(size·256/224)`` + ``CenterCrop(size)``, bicubic (``Dataset/FGVC.py:47-59``).
VPT's: ``train_crop: resize_random`` (Resize 256 + RandomCrop 224 + flip) with
``interpolation: bilinear`` (``src/data/transforms.py:14-40``). Normalised with the
backbone's mean / std (ImageNet statistics for every ViT weight).

Validation split (for ``select: val``): VPT's ``val.json`` and Flowers' ``valid`` ids are used
as they are; for the other layouts ``val_fraction`` > 0 holds out that fraction of every
class of the training split (seeded by ``val_seed``), trained on none of it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import (INTERPOLATIONS, TRAIN_CROPS, DataError, ImageTransform, ListDataset,
                                  PromptDataModule, read_json)
from prompttune.registry import DATASETS, SYNTHETIC
from prompttune.utils import atomic_write_json

LAYOUTS = ("auto", "cub", "flowers", "dogs", "cars", "vpt_json", "list")


# ------------------------------------------------------------------ layout readers
def _read_pairs(path: Path, what: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}, line {n}: expected two fields ({what}), got {line!r}")
        out.append((parts[0], parts[1].strip()))
    return out


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}: {what} must be an integer, got {value!r}") from None


def read_cub(root: Path) -> dict[str, list[tuple[str, int]]]:
    images = dict(_read_pairs(root / "images.txt", "<image id> <relative path>"))
    labels_raw = {k: _int(v, root / "image_class_labels.txt", "class id")
                  for k, v in _read_pairs(root / "image_class_labels.txt", "<image id> <class id>")}
    split = {k: _int(v, root / "train_test_split.txt", "is_training flag")
             for k, v in _read_pairs(root / "train_test_split.txt", "<image id> <is_training>")}
    missing = [i for i in images if i not in labels_raw or i not in split]
    if missing:
        raise DataError(f"{root}: image ids {missing[:3]} of images.txt have no label or split entry")
    ids = sorted(set(labels_raw.values()))
    remap = {c: i for i, c in enumerate(ids)}
    out: dict[str, list] = {"train": [], "test": []}
    for i, rel in images.items():
        out["train" if split[i] == 1 else "test"].append((str(Path("images") / rel), remap[labels_raw[i]]))
    names = {}
    if (root / "classes.txt").is_file():
        names = {_int(k, root / "classes.txt", "class id"): v for k, v in _read_pairs(root / "classes.txt", "<class id> <name>")}
    out["classnames"] = [names.get(c, str(c)) for c in ids]  # type: ignore[assignment]
    return out


def _loadmat(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"reading {path.name} needs scipy (`pip install scipy`), or use the vpt_json / list "
                        "layouts") from None
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as err:  # corrupt .mat
        raise DataError(f"could not read {path}: {err}") from None


def read_flowers(root: Path) -> dict[str, list]:
    labels = np.atleast_1d(_loadmat(root / "imagelabels.mat")["labels"]).astype(int)
    sets = _loadmat(root / "setid.mat")
    out: dict[str, list] = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        out[split] = [(f"jpg/image_{int(i):05d}.jpg", int(labels[int(i) - 1]) - 1) for i in np.atleast_1d(sets[key])]
    return out


def read_dogs(root: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for split in ("train", "test"):
        m = _loadmat(root / "lists" / f"{split}_list.mat")
        files, labels = np.atleast_1d(m["file_list"]), np.atleast_1d(m["labels"]).astype(int)
        out[split] = [(str(Path("Images") / str(f)), int(lab) - 1) for f, lab in zip(files, labels)]
    return out


def read_cars(root: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for split, file, folder in (("train", "cars_train_annos.mat", "cars_train"),
                                ("test", "cars_test_annos_withlabels.mat", "cars_test")):
        ann = np.atleast_1d(_loadmat(root / "devkit" / file)["annotations"])
        out[split] = [(f"{folder}/{a['fname']}", int(a["class"]) - 1) for a in ann]
    meta = root / "devkit" / "cars_meta.mat"
    if meta.is_file():
        out["classnames"] = [str(n) for n in np.atleast_1d(_loadmat(meta)["class_names"])]  # type: ignore[assignment]
    return out


def read_vpt_json(root: Path, image_dir: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for split in ("train", "val", "test"):
        f = root / f"{split}.json"
        if not f.is_file():
            if split == "val":
                continue
            raise DataError(f"{f} not found (the vpt_json layout needs train.json and test.json, relpath -> label)")
        data = read_json(f, f"{f} not found")
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in list(data.values())[:5]):
            raise DataError(f"{f} must map image paths to integer labels, e.g. {{\"a/b.jpg\": 3}}")
        out[split] = [(str(Path(image_dir) / k), int(v)) for k, v in data.items()]
    ids = sorted({lab for _, lab in out["train"]})
    remap = {c: i for i, c in enumerate(ids)}
    for split, rows in out.items():
        unknown = sorted({lab for _, lab in rows if lab not in remap})
        if unknown:
            raise DataError(f"{root / (split + '.json')}: class ids {unknown[:5]} do not occur in train.json")
        out[split] = [(p, remap[lab]) for p, lab in rows]
    return out


def hold_out(rows: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): ``round(fraction·n_c)`` images of every class c (at least 1 if it has 2+) go to val."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, lab) in enumerate(rows):
        by_class.setdefault(lab, []).append(i)
    val: set[int] = set()
    for lab in sorted(by_class):
        idx = by_class[lab]
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
        val.update(rng.permutation(idx)[:k].tolist())
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def read_list_file(path: Path, image_dir: str) -> list[tuple[str, int]]:
    return [(str(Path(image_dir) / rel), _int(lab, path, "label"))
            for rel, lab in _read_pairs(path, "<relative path> <label>")]


def detect_layout(root: Path) -> str:
    if (root / "images.txt").is_file() and (root / "train_test_split.txt").is_file():
        return "cub"
    if (root / "imagelabels.mat").is_file():
        return "flowers"
    if (root / "lists" / "train_list.mat").is_file():
        return "dogs"
    if (root / "devkit" / "cars_train_annos.mat").is_file():
        return "cars"
    if (root / "train.json").is_file():
        return "vpt_json"
    raise DataError(
        f"cannot tell the FGVC layout of {root}: expected CUB/NABirds (images.txt + train_test_split.txt), "
        "Flowers (imagelabels.mat), Dogs (lists/train_list.mat), Cars (devkit/cars_train_annos.mat), "
        "VPT's train.json, or set data.layout=list with train_list / test_list"
    )


def check_labels(splits: dict[str, list], where: str, every_class_in_train: bool = True) -> int:
    labels = [lab for s in ("train", "val", "test") for _, lab in splits.get(s, [])]
    if not splits.get("train"):
        raise DataError(f"{where}: the training split is empty")
    if not splits.get("test"):
        raise DataError(f"{where}: the test split is empty")
    if min(labels) < 0:
        raise DataError(f"{where}: labels must be >= 0, found {min(labels)}")
    n = max(labels) + 1
    train = {lab for _, lab in splits["train"]}
    absent = sorted(set(range(n)) - train)
    if absent and every_class_in_train:
        raise DataError(f"{where}: classes {absent[:5]} have no training image; labels must be 0..{n - 1}")
    return n


class ItemsDataModule(PromptDataModule):
    """Shared by FGVC and VTAB: ``self.splits`` = {split: [(relpath under root, label)]}."""

    every_class_in_train = True

    def __init__(self, root: str | None, synthetic: dict | None, root_hint: str, **kw: Any):
        super().__init__(**kw)
        if root is None:
            raise DataError(f"data.root must name {root_hint}")
        self.root = Path(root).expanduser()
        self.synthetic = dict(synthetic) if synthetic else None
        self.splits: dict[str, list] = {}
        self.classnames: list[str] = []
        self.num_classes = 0

    def _finish_check(self, where: str) -> None:
        self.num_classes = check_labels(self.splits, where, self.every_class_in_train)
        names = list(self.splits.pop("classnames", []) or [])  # type: ignore[arg-type]
        self.classnames = names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]
        missing = [p for s in ("train", "val", "test") for p, _ in self.splits.get(s, []) if not (self.root / p).is_file()]
        if missing:
            raise DataError(f"{where} names {len(missing)} missing images under {self.root}, e.g. {missing[:3]}")

    def make_transform(self, split: str):
        return self.transform(split)

    def val_dataloader(self):
        if not getattr(self, "splits", None):
            self.check()
        if not self.splits.get("val"):
            raise DataError(f"{type(self).__name__} at {self.root} has no validation split: "
                            + self.no_val_hint)
        return super().val_dataloader()

    no_val_hint = "set data.val_fraction (e.g. 0.1) to hold one out of the training split"

    def build(self) -> None:
        if not getattr(self, "splits", None):
            self.check()
        for split in ("train", "val", "test"):
            rows = self.splits.get(split) or []
            if rows:
                items = [{"path": str(self.root / p), "label": int(lab)} for p, lab in rows]
                self.datasets[split] = ListDataset(items, self.make_transform(split), self.on_corrupt)

    def info(self) -> dict[str, Any]:
        return {"classnames": list(self.classnames), "num_classes": self.num_classes,
                "train_size": len(self.splits.get("train", []))}


@DATASETS.register("fgvc")
class FGVCDataModule(ItemsDataModule):
    def __init__(self, root: str, layout: str = "auto", image_dir: str = "images", train_list: str | None = None,
                 test_list: str | None = None, resize_ratio: float = 256 / 224, synthetic: dict | None = None,
                 train_crop: str = "random_resized", interpolation: str = "bicubic", val_fraction: float = 0.0,
                 val_seed: int = 0, **kw: Any):
        super().__init__(root, synthetic, "the dataset folder", **kw)
        if layout not in LAYOUTS:
            raise DataError(f"data.layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if train_crop not in TRAIN_CROPS:
            raise DataError(f"data.train_crop={train_crop!r}: expected one of {', '.join(TRAIN_CROPS)}")
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"data.interpolation={interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise DataError(f"data.val_fraction={val_fraction!r}: expected a number in [0, 1)")
        self.layout, self.image_dir = layout, image_dir
        self.train_list, self.test_list, self.resize_ratio = train_list, test_list, float(resize_ratio)
        self.train_crop, self.interpolation = train_crop, interpolation
        self.val_fraction, self.val_seed = float(val_fraction), int(val_seed)

    def check(self) -> None:
        self.prepare_root("FGVC dataset", "one of the layouts cub, flowers, dogs, cars, vpt_json, list")
        layout = self.layout
        if layout == "list" or (layout == "auto" and self.train_list):
            layout = "list"
            if not (self.train_list and self.test_list):
                raise DataError("data.layout=list needs data.train_list and data.test_list (files of 'relpath label')")
        elif layout == "auto":
            layout = detect_layout(self.root)
        if layout == "cub":
            splits = read_cub(self.root)
        elif layout == "flowers":
            splits = read_flowers(self.root)
        elif layout == "dogs":
            splits = read_dogs(self.root)
        elif layout == "cars":
            splits = read_cars(self.root)
        elif layout == "vpt_json":
            splits = read_vpt_json(self.root, self.image_dir)
        else:
            splits = {"train": read_list_file(self.root / self.train_list, self.image_dir),
                      "test": read_list_file(self.root / self.test_list, self.image_dir)}
        self.detected_layout = layout
        if self.val_fraction > 0:
            if splits.get("val"):
                raise DataError(f"data.val_fraction={self.val_fraction} but the {layout} layout of {self.root} has its "
                                "own validation split; set data.val_fraction=0")
            splits["train"], splits["val"] = hold_out(splits["train"], self.val_fraction, self.val_seed)
        self.splits = splits
        self._finish_check(f"FGVC dataset {self.root} ({layout} layout)")

    def make_transform(self, split: str) -> ImageTransform:
        return ImageTransform(self.image_size, self.mean, self.std, augment=self.augment and split == "train",
                              resize_ratio=self.resize_ratio, seed=self.seed, train_crop=self.train_crop,
                              interpolation=self.interpolation)


# ------------------------------------------------------------------ synthetic world, CUB layout
@SYNTHETIC.register("fgvc_cub")
def write_cub(root: Path, n_train: int = 16, n_test: int = 25, side: int = 32, seed: int = 0,
              background: str = "noise") -> None:
    """The 16 fine '<pattern> <shape>' classes of the synthetic world, in CUB-200-2011's layout."""
    from prompttune.data.world import fine_classes, render, sample_object, save_png

    root = Path(root)
    rng = np.random.default_rng(seed)
    lines = {"images": [], "labels": [], "split": [], "classes": []}
    k = 0
    for c, cls in enumerate(fine_classes(), start=1):
        sub, cat = cls.split(" ")
        folder = f"{c:03d}.{cls.replace(' ', '_')}"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        lines["classes"].append(f"{c} {folder}")
        for is_train, n in ((1, n_train), (0, n_test)):
            for _ in range(n):
                k += 1
                img, _ = render([sample_object(rng, category=cat, subcategory=sub)], side, rng, background)
                rel = f"{folder}/{cls.replace(' ', '_')}_{k:05d}.png"
                save_png(root / "images" / rel, img)
                lines["images"].append(f"{k} {rel}")
                lines["labels"].append(f"{k} {c}")
                lines["split"].append(f"{k} {is_train}")
    for name, key in (("images.txt", "images"), ("image_class_labels.txt", "labels"),
                      ("train_test_split.txt", "split"), ("classes.txt", "classes")):
        (root / name).write_text("\n".join(lines[key]) + "\n")
    atomic_write_json(root / "counts.json", dict(Counter(s.split()[1] for s in lines["split"])))
