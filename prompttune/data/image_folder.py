"""Image classification in CoOp's dataset layouts (the 11 datasets of CoOp / CoCoOp / MaPLe).

Three layouts (``data.layout``), each read exactly as KaiyangZhou/CoOp ``datasets/*.py`` does:

* ``split_json`` (9 datasets): ``<root>/<image_dir>/...`` + CoOp's split file
  (``split_zhou_OxfordPets.json`` and friends)::

      {"train": [["class_dir/img.jpg", label, "classname"], ...], "val": [...], "test": [...]}

* ``fgvc_aircraft`` (``datasets/fgvc_aircraft.py:22-71``): ``variants.txt`` (class names, in
  label order) and ``images_variant_{train,val,test}.txt`` (``<image id> <variant name>`` per
  line), images under ``images/<image id>.jpg``.
* ``imagenet`` (``datasets/imagenet.py:30-91``): ``classnames.txt`` (``<wnid> <class name>``
  per line), images under ``images/train/<wnid>/`` and ``images/val/<wnid>/``; labels follow
  the sorted folder names; the official code tests on ``val`` and uses it as its validation
  set too, so here there is no separate validation split (``select: val`` is refused).

**Few-shot subsets** (``shots: K``, seed ``fewshot_seed``, default the run's seed) are CoOp's:

1. an official ``<root>/split_fewshot/shot_K-seed_S.pkl`` when present (the files CoOp writes
   and that users share), read WITHOUT unpickling code: :class:`FewshotUnpickler` allows only
   Dassl's ``Datum`` (rebuilt as an inert record) and plain containers; its absolute image
   paths are matched to this root's split rows by path suffix;
2. else prompttune's own cache ``shot_K-seed_S.json`` of an earlier official-style draw;
3. else the official draw, reproduced: Dassl ``DatasetBase.generate_fewshot_dataset``
   (``dassl/data/datasets/base_dataset.py:167-209``) after ``set_random_seed(seed)``
   (``dassl/utils/tools.py:73``): Python's ``random`` seeded with the seed, classes in order of
   first appearance in the split, ``random.sample(items, K)`` per class (all items when fewer),
   train first and then ``min(K, 4)`` per class from val on the same stream
   (``datasets/oxford_pets.py:33-49``). It is saved as ``shot_K-seed_S.json`` and reused, so
   all methods of a comparison see the same images.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import DataError, ListDataset, PromptDataModule, read_json
from prompttune.registry import DATASETS, SYNTHETIC
from prompttune.utils import atomic_write_json

SPLITS = ("train", "val", "test")
LAYOUTS = ("split_json", "fgvc_aircraft", "imagenet")
SAMPLER = "dassl-random"  # marks a cached draw made the official way (older caches used numpy)
log = logging.getLogger("prompttune")


def read_split_file(path: Path, required: tuple[str, ...] = ("train", "test")) -> dict[str, list]:
    data = read_json(path, f"split file not found: {path} (expected CoOp's JSON with train/val/test lists)",
                     "split file ")
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise DataError(f"split file {path} must map {', '.join(map(repr, required))} (and 'val') "
                        "to lists of [path, label, classname]")
    for split in SPLITS:
        for row in (data.get(split) or [])[:3]:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], int)):
                raise DataError(f"split file {path}, split {split!r}: rows must be [path, label, classname], got {row!r}")
    return {k: v for k, v in data.items() if k in SPLITS}


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


# ---------------------------------------------------------------------------- the official few-shot draw
def fewshot_rows(rows: list, shots: int, seed: int | None = None, rng: random.Random | None = None) -> list:
    """Dassl's ``generate_fewshot_dataset`` on rows ``[path, label, ...]``: per class, in order of
    first appearance, ``rng.sample(items, shots)`` (every item when a class has fewer), with
    ``rng = random.Random(seed)`` (= the global ``random`` after ``set_random_seed(seed)``)."""
    rng = rng if rng is not None else random.Random(seed)
    by_label: dict[Any, list] = {}  # insertion-ordered, as Dassl's defaultdict tracker
    for r in rows:
        by_label.setdefault(r[1], []).append(r)
    out: list = []
    for items in by_label.values():
        out += rng.sample(items, shots) if len(items) >= shots else list(items)
    return out


def official_fewshot_draw(data: dict[str, list], shots: int, seed: int) -> dict[str, list]:
    """Train then val (``min(shots, 4)`` per class) from one stream, as CoOp's dataset classes do."""
    rng = random.Random(seed)
    out = {"train": fewshot_rows(data["train"], shots, rng=rng)}
    if data.get("val"):
        out["val"] = fewshot_rows(data["val"], min(shots, 4), rng=rng)
    return out


# ---------------------------------------------------------------------------- official .pkl files, safely
class _Datum:
    """Inert stand-in for ``dassl.data.datasets.base_dataset.Datum``: only holds its fields."""

    __slots__ = ("impath", "label", "domain", "classname")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = state[0] or state[1]
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected Datum state {type(state).__name__}")
        self.impath = str(state.get("_impath", ""))
        self.label = int(state.get("_label", 0))
        self.domain = int(state.get("_domain", 0))
        self.classname = str(state.get("_classname", ""))


def _reconstructor(cls, base, state):  # copyreg._reconstructor of pickle protocols 0/1, restricted
    if cls is not _Datum or base is not object:
        raise pickle.UnpicklingError("only Datum objects may be reconstructed")
    return _Datum.__new__(_Datum)


class FewshotUnpickler(pickle.Unpickler):
    """Reads CoOp's ``split_fewshot/*.pkl`` (dicts/lists of Dassl ``Datum``) without running code:
    every global other than ``Datum`` (and ``object`` / copyreg's reconstructor for old pickle
    protocols, restricted to Datum) is refused."""

    ALLOWED = {("dassl.data.datasets.base_dataset", "Datum"), ("dassl.data.datasets", "Datum"),
               ("dassl.data", "Datum")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return _Datum
        if (module, name) in (("builtins", "object"), ("__builtin__", "object")):
            return object
        if (module, name) in (("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return _reconstructor
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a few-shot split file "
                                     "(only dassl Datum records are allowed)")


def read_fewshot_pickle(path: Path) -> dict[str, list[tuple[str, int, str]]]:
    """``{"train": [(impath, label, classname), ...], "val": [...]}`` from an official .pkl file."""
    try:
        data = FewshotUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"could not read the official few-shot split {path}: {err}") from None
    if not isinstance(data, dict) or "train" not in data:
        raise DataError(f"{path}: expected a dict with 'train' (and 'val') lists of Datum, got {type(data).__name__}")
    out = {}
    for split, items in data.items():
        if split not in ("train", "val"):
            continue
        if not isinstance(items, list) or not all(isinstance(d, _Datum) for d in items):
            raise DataError(f"{path}: {split!r} must be a list of Datum records")
        out[split] = [(d.impath, d.label, d.classname) for d in items]
    return out


def match_official_rows(items: list[tuple[str, int, str]], rows: list, where: str) -> list:
    """Map the absolute image paths of an official pickle (another machine's root) to this root's
    rows by the longest path suffix that names a row; labels must agree."""
    by_rel = {str(r[0]).replace("\\", "/"): r for r in rows}
    out = []
    for impath, label, _ in items:
        parts = impath.replace("\\", "/").split("/")
        row = next((by_rel[k] for k in ("/".join(parts[i:]) for i in range(len(parts))) if k in by_rel), None)
        if row is None:
            raise DataError(f"{where}: image {impath!r} matches no image of this dataset's split")
        if int(row[1]) != int(label):
            raise DataError(f"{where}: image {impath!r} has label {label} there but {row[1]} here")
        out.append(row)
    return out


# ---------------------------------------------------------------------------- layouts without a split JSON
def read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def read_fgvc_aircraft(root: Path, image_dir: str = "images") -> dict[str, list]:
    """CoOp's FGVCAircraft: ``variants.txt`` + ``images_variant_<split>.txt`` (fgvc_aircraft.py:22-71)."""
    classnames = read_lines(root / "variants.txt", "FGVCAircraft class list (variants.txt)")
    cname2lab = {c: i for i, c in enumerate(classnames)}
    data = {}
    for split in SPLITS:
        rows = []
        name = f"images_variant_{split}.txt"
        for ln in read_lines(root / name, f"FGVCAircraft {split} list ({name})"):
            imname, _, variant = ln.partition(" ")
            if variant not in cname2lab:
                raise DataError(f"{root / name}: variant {variant!r} of image {imname} is not in variants.txt")
            rows.append([f"{imname}.jpg", cname2lab[variant], variant])
        data[split] = rows
    return data


def read_imagenet(root: Path, image_dir: str = "images") -> dict[str, list]:
    """CoOp's ImageNet: ``classnames.txt`` + ``images/{train,val}/<wnid>/`` (imagenet.py:30-91);
    test = val. Images within a class in sorted order (the official ``os.listdir`` order is the
    file system's)."""
    names = {}
    for ln in read_lines(root / "classnames.txt", "ImageNet class names (classnames.txt)"):
        wnid, _, name = ln.partition(" ")
        names[wnid] = name
    data: dict[str, list] = {}
    for split, folder in (("train", "train"), ("test", "val")):
        split_dir = root / image_dir / folder
        if not split_dir.is_dir():
            raise DataError(f"ImageNet {split} folder not found: {split_dir} (expected {image_dir}/{folder}/<wnid>/*)")
        rows = []
        for label, wnid in enumerate(sorted(p.name for p in split_dir.iterdir() if p.is_dir())):
            if wnid not in names:
                raise DataError(f"{split_dir / wnid}: folder {wnid!r} is not listed in classnames.txt")
            for img in sorted(p.name for p in (split_dir / wnid).iterdir() if not p.name.startswith(".")):
                rows.append([f"{folder}/{wnid}/{img}", label, names[wnid]])
        data[split] = rows
    data["val"] = []
    return data


@DATASETS.register("image_folder")
class ImageFolderDataModule(PromptDataModule):
    def __init__(self, root: str, split_file: str | None = None, image_dir: str = "images", shots: int = 0,
                 fewshot_seed: int | None = None, synthetic: dict | None = None, layout: str = "split_json",
                 template: str | None = None, coop_name: str | None = None, **kw: Any):
        super().__init__(**kw)
        if layout not in LAYOUTS:
            raise DataError(f"data.layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
        if layout == "split_json" and not split_file:
            raise DataError("data.split_file is required with data.layout=split_json (e.g. split_zhou_OxfordPets.json)")
        self.root, self.split_name, self.image_dir = Path(root).expanduser(), split_file, image_dir
        self.layout, self.template, self.coop_name = layout, template, coop_name
        self.shots = int(shots or 0)
        self.fewshot_seed = self.seed if fewshot_seed is None else int(fewshot_seed)
        self.synthetic = dict(synthetic) if synthetic else None
        self.classnames: list[str] = []
        self.fewshot_source: str | None = None  # which few-shot file or draw was used

    @property
    def split_path(self) -> Path:
        return self.root / (self.split_name or "")

    def read_layout(self) -> dict[str, list]:
        if self.layout == "fgvc_aircraft":
            return read_fgvc_aircraft(self.root, self.image_dir)
        if self.layout == "imagenet":
            return read_imagenet(self.root, self.image_dir)
        return read_split_file(self.split_path)

    def check(self) -> None:
        expected = {"split_json": f"{self.image_dir}/ and {self.split_name}",
                    "fgvc_aircraft": "variants.txt, images_variant_{train,val,test}.txt and images/",
                    "imagenet": "classnames.txt and images/{train,val}/<wnid>/"}[self.layout]
        self.prepare_root("dataset", expected)
        data = self.read_layout()
        where = self.split_path if self.layout == "split_json" else self.root
        self.classnames = classnames_from_split(data, where)
        if len(self.classnames) < 2:
            raise DataError(f"{where} has {len(self.classnames)} class ({self.classnames}); classification needs "
                            "at least 2 classes")
        self._check_shots(data["train"])
        image_root = self.root / self.image_dir
        missing = [r[0] for s in data.values() for r in s if not (image_root / r[0]).is_file()]
        if missing:
            raise DataError(
                f"{where} names {len(missing)} missing images under {image_root}, e.g. {missing[:3]}"
            )
        self._data = data

    def _check_shots(self, train_rows: list) -> None:
        """``shots`` larger than a class: that class is used whole (as CoOp's draw does); say so,
        and record the real counts in result.json (``data_record``) instead of the request alone."""
        counts: dict[int, int] = {}
        for row in train_rows:
            counts[row[1]] = counts.get(row[1], 0) + 1
        self.shots_used = None
        if self.shots and counts:
            used = [min(self.shots, n) for n in counts.values()]
            self.shots_used = {"requested": self.shots, "min_per_class": min(used), "max_per_class": max(used),
                               "classes_short": sum(n < self.shots for n in counts.values())}
            if self.shots_used["classes_short"]:
                log.warning("data.shots=%d, but %d of %d classes have fewer training images (smallest: %d); those "
                            "classes are used whole, and result.json records the counts used (data_record.shots_used)",
                            self.shots, self.shots_used["classes_short"], len(counts), min(counts.values()))

    def record(self) -> dict[str, Any]:
        return {"shots_used": getattr(self, "shots_used", None),
                "fewshot_source": getattr(self, "fewshot_source", None)}

    def fewshot_split(self) -> dict[str, list]:
        data = self._data
        if not self.shots:
            self.fewshot_source = None
            return data
        folder = self.root / "split_fewshot"
        stem = f"shot_{self.shots}-seed_{self.fewshot_seed}"
        out = {"test": data["test"], "val": data.get("val") or []}
        official = folder / f"{stem}.pkl"
        if official.is_file():
            got = read_fewshot_pickle(official)
            out["train"] = match_official_rows(got["train"], data["train"], f"{official} (train)")
            if got.get("val") and data.get("val"):
                out["val"] = match_official_rows(got["val"], data["val"], f"{official} (val)")
            self.fewshot_source = str(official)
            return out
        cache = folder / f"{stem}.json"
        if cache.is_file():
            cached = read_split_file(cache, required=("train",))
            if json.loads(cache.read_text()).get("sampler") == SAMPLER:
                out.update({k: v for k, v in cached.items() if k in ("train", "val") and v is not None})
                if not data.get("val"):
                    out["val"] = []
                self.fewshot_source = str(cache)
                return out
            log.warning("%s holds an older (numpy) few-shot draw; redrawing as the official code does", cache)
        drawn = official_fewshot_draw(data, self.shots, self.fewshot_seed)
        atomic_write_json(cache, {"sampler": SAMPLER, "train": drawn["train"], "val": drawn.get("val", [])})
        out.update(drawn)
        self.fewshot_source = f"{cache} (official draw)"
        return out

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
        info: dict[str, Any] = {"classnames": list(self.classnames), "num_classes": len(self.classnames)}
        if self.template:
            info["template"] = self.template  # CoOp's per-dataset zero-shot template (zsclip.py CUSTOM_TEMPLATES)
        if self.coop_name:
            info["coop_name"] = self.coop_name
        return info


def ensure_synthetic(spec: dict, root: Path) -> None:
    """Write a synthetic-world dataset into ``root`` if it is not there with the same spec.
    Processes sharing the data folder (``sweep --jobs`` workers, SLURM tasks) take turns through a
    lock file beside it: one writes, the others wait and then find it written (without the lock,
    a second process saw the first one's half-written folder and refused it)."""
    from filelock import FileLock

    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        _ensure_synthetic(spec, root)


def _ensure_synthetic(spec: dict, root: Path) -> None:
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
