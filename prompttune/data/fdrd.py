"""FDRD (Fine-class Described Retrieval Dataset, DCAR paper) image-text retrieval data.

The released JSON files (``wyf202322/DCAR``, ``FDRD/{train,test}/<name>_{train,test}.json``)
map an item id to a record::

    "Sphynx_43": {"file_name": "Sphynx_43",
                  "file_path": "/root/.../DATA/oxford_pets/images/Sphynx_43.jpg",
                  "positive": "A Sphynx with striking green eyes ...",
                  "negative": ["A german shorthaired with striking green eyes ...", ... 4 in all]}

Test files carry four negatives made by swapping the sub-category name; train files have
``"negative": []``, a ``class_name`` and ``"file_path": "YOUR_IMAGE_PATH"``; the flowers
file adds ``class_name`` and ``number``. ``file_path`` points into the authors' machine, so
images are found under a CoOp-style dataset folder (``data.root``) in this order:

1. ``file_path`` itself, if it exists;
2. the part of ``file_path`` after ``/<image_dir>/`` (``images/Sphynx_43.jpg``), or after
   the dataset folder's own name, taken under ``root``;
3. a file under ``root/<image_dir>`` whose name is ``basename(file_path)``, ``file_name``,
   ``file_name`` + an image extension, or ``image_<number>.jpg`` (CoOp's Flowers102 names).

Class (sub-category) of an item: ``class_name`` if present, else the item key without its
trailing ``_<digits>`` (``Sphynx_43`` -> ``Sphynx``, ``707-320_1514522`` -> ``707-320``). An
underscore in a key stands for a space (``British_Shorthair``) *or* a slash (the planes file
writes "F-16A/B" as ``F-16A_B_1614884`` and "F/A-18" as ``F_A-18_...``): each underscore takes
the separator the class's positive captions use (majority over the class's items), else a
space. Class names are matched in captions as whole words, case-insensitively, with any run
of spaces/underscores between words (:func:`class_pattern`); :func:`swap_class` replaces
*every* occurrence, as the released negatives do (1,537 of 3,669 pets captions name their
class twice or more). The class a negative caption swapped in is the longest class name it
contains that its positive does not (``-1`` if none): the 1-positive-plus-M-negatives
text-to-image protocol needs it (see ``tasks/retrieval.py``).

Evaluation files may have no negatives (``"negative": []``, as the DTD, Caltech and UCF test
files in the DCAR repository's history): whole-gallery Recall@K needs none; the
1-positive-plus-M-negatives metrics are then skipped. Within one file every item must have
the same number of negatives.

The synthetic writer (``@SYNTHETIC.register("fdrd")``) writes the same JSON format, with
foreign absolute ``file_path`` values like the released files, and sub-category-swapped
hard negatives.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prompttune.data.base import DataError, ListDataset, PromptDataModule, read_json
from prompttune.data.image_folder import fewshot_rows
from prompttune.registry import DATASETS, SYNTHETIC
from prompttune.utils import atomic_write_json

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")
_TRAILING_NUM = re.compile(r"_\d+$")
# a class name is a whole "word": not inside a longer name ("A330" is not in "A330-200", "F-16A/B" not in "XF-16A/B")
_WORD_START = r"(?<![\w/])(?<!\w-)"
_WORD_END = r"(?![\w/]|-\w)"


def key_stem(key: str) -> str:
    """The class part of an item key, underscores kept: ``F-16A_B_1614884`` -> ``F-16A_B``."""
    stem = key
    for ext in IMAGE_EXTS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return _TRAILING_NUM.sub("", stem).strip()


def class_from_key(key: str, captions: list[str] | tuple[str, ...] = ()) -> str:
    """Class name of an item key; each ``_`` becomes the separator (space or '/') that the
    captions use at that place (majority vote over the captions that name the class), else a space."""
    stem = key_stem(key)
    parts = stem.split("_")
    if len(parts) == 1:
        return stem
    pat = re.compile(_WORD_START + r"([ /_])".join(re.escape(p) for p in parts) + _WORD_END, re.IGNORECASE)
    votes: dict[tuple[str, ...], int] = {}
    for cap in captions:
        for m in pat.finditer(cap):
            seps = tuple(" " if g == "_" else g for g in m.groups())
            votes[seps] = votes.get(seps, 0) + 1
    seps = max(votes, key=lambda k: (votes[k], k.count(" "))) if votes else (" ",) * (len(parts) - 1)
    out = parts[0]
    for sep, part in zip(seps, parts[1:]):
        out += sep + part
    return out.strip()


def class_pattern(classname: str) -> re.Pattern:
    """Whole-word, case-insensitive match of a class name; spaces/underscores match any run of them."""
    words = [w for w in re.split(r"[\s_]+", classname.strip()) if w]
    if not words:
        raise ValueError("empty class name")
    body = r"[\s_]+".join(re.escape(w) for w in words)
    return re.compile(_WORD_START + body + _WORD_END, re.IGNORECASE)


def contains_class(caption: str, classname: str) -> bool:
    return bool(classname) and class_pattern(classname).search(caption) is not None


def swap_class(caption: str, old: str, new: str) -> str | None:
    """``caption`` with *every* occurrence of class ``old`` (any case, whole words) replaced by
    ``new``; ``None`` when ``old`` does not occur."""
    if not old:
        return None
    out, n = class_pattern(old).subn(lambda _m: new, caption)
    return out if n else None


def read_fdrd_json(path: Path, need_negatives: bool) -> list[dict[str, Any]]:
    """Records of one FDRD file, validated: a clear error names the file, item and key."""
    data = read_json(path, f"FDRD file not found: {path} (expected FDRD JSON: {{id: {{file_path, positive, negative}}}})",
                     "FDRD file ")
    if not isinstance(data, dict) or not data:
        raise DataError(f"FDRD file {path} must be a non-empty mapping of item id to "
                        "{file_name, file_path, positive, negative}")
    out = []
    n_neg = None
    for key, rec in data.items():
        if not isinstance(rec, dict):
            raise DataError(f"FDRD file {path}, item {key!r}: expected a mapping, got {type(rec).__name__}")
        for field in ("file_path", "positive", "negative"):
            if field not in rec:
                raise DataError(f"FDRD file {path}, item {key!r}: missing key {field!r} "
                                f"(has {sorted(rec)}; expected file_name, file_path, positive, negative)")
        if not isinstance(rec["positive"], str) or not rec["positive"].strip():
            raise DataError(f"FDRD file {path}, item {key!r}: 'positive' must be a non-empty caption string")
        negs = rec["negative"]
        if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
            raise DataError(f"FDRD file {path}, item {key!r}: 'negative' must be a list of caption strings")
        if need_negatives:  # evaluation files: 0 negatives is fine (whole-gallery R@K), but the same count everywhere
            if n_neg is None:
                n_neg = len(negs)
            elif len(negs) != n_neg:
                raise DataError(f"FDRD file {path}, item {key!r}: has {len(negs)} negatives, earlier items "
                                f"have {n_neg}; every evaluation item needs the same number (0 is allowed)")
        out.append({"key": str(key), "file_name": str(rec.get("file_name") or key), "file_path": str(rec["file_path"]),
                    "number": rec.get("number"), "positive": rec["positive"], "negative": list(negs),
                    "class_name": str(rec["class_name"]).replace("_", " ").strip() if rec.get("class_name") else None})
    # key-derived class names: resolve '_' as ' ' or '/' from all captions of the class at once
    by_stem: dict[str, list[str]] = {}
    for r in out:
        if r["class_name"] is None:
            by_stem.setdefault(key_stem(r["key"]), []).append(r["positive"])
    names = {stem: class_from_key(stem, caps) for stem, caps in by_stem.items()}
    for r in out:
        if r["class_name"] is None:
            r["class_name"] = names[key_stem(r["key"])]
    return out


class ImageLocator:
    """Find an FDRD item's image under a CoOp-style dataset folder (see the module docstring)."""

    def __init__(self, root: Path, image_dir: str):
        self.root, self.image_dir = root, image_dir.strip("/")
        self._index: dict[str, Path] | None = None

    def index(self) -> dict[str, Path]:
        if self._index is None:
            base = self.root / self.image_dir
            self._index = {}
            for p in sorted(base.rglob("*")):
                if p.suffix in IMAGE_EXTS:
                    self._index.setdefault(p.name, p)
        return self._index

    def find(self, rec: dict[str, Any]) -> Path | None:
        fp = rec["file_path"]
        if fp and fp != "YOUR_IMAGE_PATH":
            p = Path(fp)
            if p.is_absolute() and p.is_file():
                return p
            parts = p.parts
            for marker in (self.image_dir.split("/")[0], self.root.name):
                if marker in parts:
                    i = len(parts) - 1 - parts[::-1].index(marker)
                    tail = Path(*parts[i + 1:]) if marker == self.root.name else Path(*parts[i:])
                    if (self.root / tail).is_file():
                        return self.root / tail
        idx = self.index()
        names = [Path(fp).name] if fp and fp != "YOUR_IMAGE_PATH" else []
        fn = rec["file_name"]
        names += [fn] + [fn + e for e in IMAGE_EXTS]
        if rec.get("number") is not None:
            names.append(f"image_{rec['number']}.jpg")
        for n in names:
            if n in idx:
                return idx[n]
        return None


def swapped_class(negative: str, positive: str, classnames: list[str]) -> int:
    """Index of the longest class name in ``negative`` and not in ``positive`` (whole words, any case); -1 if none."""
    best, best_len = -1, 0
    for i, c in enumerate(classnames):
        if len(c) > best_len and contains_class(negative, c) and not contains_class(positive, c):
            best, best_len = i, len(c)
    return best


class FDRDDataset(ListDataset):
    """Yields ``{image, index, label, caption_id, caption, negatives, neg_labels}``.

    ``caption_id``: identical positive captions share an id (in the synthetic world, and in
    real data, several images can have the same caption: the task counts all as correct).
    """

    def __init__(self, items: list[dict[str, Any]], transform, on_corrupt: str = "error"):
        super().__init__(items, transform, on_corrupt)
        ids: dict[str, int] = {}
        for it in items:
            it["caption_id"] = ids.setdefault(it["positive"], len(ids))

    def _fields(self, j: int) -> dict[str, Any]:
        it = self.items[j]
        return {"label": torch.tensor(it["label"]), "caption_id": torch.tensor(it["caption_id"]),
                "caption": it["positive"], "negatives": list(it["negative"]),
                "neg_labels": torch.tensor(it["neg_labels"], dtype=torch.long)}

    @staticmethod
    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {k: torch.stack([r[k] for r in rows])
                               for k in ("image", "index", "label", "caption_id") if k in rows[0]}
        out["caption"] = [r["caption"] for r in rows]
        n = {len(r["negatives"]) for r in rows}
        if len(n) > 1:
            raise DataError(f"a batch mixes items with {sorted(n)} negative captions; FDRD items need the same number")
        out["negatives"] = [r["negatives"] for r in rows]
        out["neg_labels"] = torch.stack([r["neg_labels"] for r in rows]) if n != {0} else torch.zeros(len(rows), 0,
                                                                                                       dtype=torch.long)
        return out


@DATASETS.register("fdrd")
class FDRDDataModule(PromptDataModule):
    """FDRD JSON files + images from a CoOp-style dataset folder.

    ``train_file`` (may be ``null``: evaluation only), ``test_file``, optional ``val_file``:
    paths relative to ``root`` or absolute. ``shots``: K training items per class (CoOp's
    few-shot draw per seed; 0 = all).
    """

    def __init__(self, root: str, test_file: str, train_file: str | None = None, val_file: str | None = None,
                 image_dir: str = "images", shots: int = 0, fewshot_seed: int | None = None,
                 synthetic: dict | None = None, **kw: Any):
        super().__init__(**kw)
        self.root, self.image_dir = Path(root).expanduser(), image_dir
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.shots = int(shots or 0)
        self.fewshot_seed = self.seed if fewshot_seed is None else int(fewshot_seed)
        self.synthetic = dict(synthetic) if synthetic else None
        self.classnames: list[str] = []
        self._records: dict[str, list[dict[str, Any]]] = {}

    def _path(self, f: str) -> Path:
        p = Path(f).expanduser()
        return p if p.is_absolute() else self.root / p

    def check(self) -> None:
        if not self.files["test"]:
            raise DataError("data.test_file is required: the FDRD test JSON (e.g. FDRD/test/pets_test.json)")
        self.prepare_root("FDRD dataset", f"{self.image_dir}/ (CoOp layout) and the FDRD JSON files")
        locator = ImageLocator(self.root, self.image_dir)
        records = {}
        for split, f in self.files.items():
            if not f:
                continue
            path = self._path(f)
            recs = read_fdrd_json(path, need_negatives=split != "train")
            missing = []
            for r in recs:
                r["path"] = locator.find(r)
                if r["path"] is None:
                    missing.append(r["key"])
            if missing:
                raise DataError(
                    f"FDRD file {path}: no image found for {len(missing)} of {len(recs)} items under "
                    f"{self.root / self.image_dir}, e.g. {missing[:3]} (looked for file_path, its tail after "
                    f"'{self.image_dir}/', and file_name)")
            records[split] = recs
        names = sorted({r["class_name"] for recs in records.values() for r in recs}, key=str.lower)
        self.classnames = names
        lookup = {c: i for i, c in enumerate(names)}
        for recs in records.values():
            for r in recs:
                r["label"] = lookup[r["class_name"]]
                r["neg_labels"] = [swapped_class(n, r["positive"], names) for n in r["negative"]]
        if "train" in records:
            unseen = sorted({r["class_name"] for r in records["test"]} - {r["class_name"] for r in records["train"]})
            self.unseen_test_classes = unseen
        self._records = records

    def build(self) -> None:
        if not self._records:
            self.check()
        for split, recs in self._records.items():
            items = [dict(r, path=str(r["path"])) for r in recs]
            if split == "train" and self.shots:
                rows = fewshot_rows([[i, it["label"], ""] for i, it in enumerate(items)], self.shots, self.fewshot_seed)
                items = [items[r[0]] for r in rows]
            self.datasets[split] = FDRDDataset(items, self.transform(split), self.on_corrupt)

    def info(self) -> dict[str, Any]:
        train = self._records.get("train", [])
        return {"classnames": list(self.classnames), "num_classes": len(self.classnames),
                "train_captions": [r["positive"] for r in train],
                "n_negatives": len(self._records["test"][0]["negative"]) if self._records.get("test") else 0}


LOOKALIKE_KINDS = ("subcategory", "color", "size")


def nearest_color(color: str) -> str:
    """The world colour nearest to ``color`` in RGB (the look-alike colour: red -> orange, blue -> purple)."""
    from prompttune.data.world import COLORS

    ref = np.array(COLORS[color], dtype=float)
    return min((c for c in COLORS if c != color), key=lambda c: (float(np.sum((np.array(COLORS[c]) - ref) ** 2)), c))


def lookalike(obj, kind: str, rng: np.random.Generator):
    """A copy of ``obj`` that differs in exactly one caption word: its sub-category (another pattern
    of the same shape: a different fine class), its colour (the nearest colour) or its size."""
    import dataclasses

    from prompttune.data.world import SUBCATEGORIES

    if kind == "subcategory":
        others = [s for s in SUBCATEGORIES if s != obj.subcategory]
        return dataclasses.replace(obj, subcategory=others[int(rng.integers(len(others)))])
    if kind == "color":
        return dataclasses.replace(obj, color=nearest_color(obj.color))
    if kind == "size":
        size = "small" if obj.size == "large" else "large"
        radius = obj.radius * (0.7 if size == "small" else 1.0 / 0.7)
        return dataclasses.replace(obj, size=size, radius=radius)
    raise ValueError(f"unknown look-alike kind {kind!r}; valid: {', '.join(LOOKALIKE_KINDS)}")


# ------------------------------------------------------------------ synthetic writer
@SYNTHETIC.register("fdrd")
def write_fdrd(root: Path, n_train: int = 16, n_val: int = 4, n_test: int = 20, side: int = 32, seed: int = 0,
               background: str = "noise", n_negatives: int = 4, lookalikes: list[str] | tuple[str, ...] = ()) -> None:
    """FDRD-format retrieval data from the synthetic world.

    Fine classes are "<pattern> <shape>" (16). Captions always name the fine class and the
    attributes ("a large red striped disc"). Each test item gets ``n_negatives`` captions with
    the sub-category swapped: the other patterns of the same shape first (the hardest: same
    meta-category), then fine classes of other shapes. Images go flat into ``images/`` (like
    CoOp's oxford_pets); ``file_path`` is a foreign absolute path, as in the released files,
    and train records use ``"file_path": "YOUR_IMAGE_PATH"`` with ``class_name``, as released.

    ``lookalikes`` (e.g. ``[subcategory, color, size]``): each val/test item ("anchor") comes with
    one look-alike per kind, rendered from the same random state (same background, position,
    pattern phase, noise) and differing from it in exactly that one caption word (:func:`lookalike`).
    The gallery then holds groups of images that only the sub-category or an attribute word tells
    apart, and each such word decides which image a caption retrieves. Training pairs are drawn as
    without look-alikes (the look-alikes are what the method must learn to separate).
    """
    from prompttune.data.world import SUBCATEGORIES, fine_classes, render, sample_object, save_png

    bad = [k for k in lookalikes if k not in LOOKALIKE_KINDS]
    if bad or len(set(lookalikes)) != len(lookalikes):
        raise ValueError(f"synthetic.lookalikes={list(lookalikes)!r}: expected distinct kinds among "
                         f"{', '.join(LOOKALIKE_KINDS)}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = fine_classes()
    files: dict[str, dict] = {"train": {}, "val": {}, "test": {}}

    def eval_item(split: str, obj, fname: str, img) -> None:
        save_png(root / "images" / f"{fname}.png", img)
        cls = obj.fine_class
        pos = obj.caption(with_subcategory=True, with_attributes=True)
        siblings = [f"{s} {obj.category}" for s in SUBCATEGORIES if s != obj.subcategory]
        others = [c for c in classes if not c.endswith(" " + obj.category)]
        extra = [others[j] for j in rng.permutation(len(others))]
        negs = [swap_class(pos, cls, s) for s in (siblings + extra)[:n_negatives]]
        key = f"{cls.replace(' ', '_')}_{len(files[split]) + 1}"
        files[split][key] = {"file_name": fname, "file_path": f"/root/DATA/synth_fdrd/images/{fname}.png",
                             "positive": pos, "negative": negs}

    for cls in classes:
        sub, cat = cls.split(" ")
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for i in range(n):
                obj = sample_object(rng, category=cat, subcategory=sub)
                fname = f"{cls.replace(' ', '_')}_{split}_{i:04d}"
                if split != "train" and lookalikes:
                    state = int(rng.integers(2 ** 31))
                    img, _ = render([obj], side, np.random.default_rng(state), background)
                    eval_item(split, obj, fname, img)
                    for kind in lookalikes:
                        twin = lookalike(obj, kind, rng)
                        img, _ = render([twin], side, np.random.default_rng(state), background)
                        eval_item(split, twin, f"{fname}_{kind}", img)
                    continue
                img, _ = render([obj], side, rng, background)
                if split != "train":
                    eval_item(split, obj, fname, img)
                    continue
                save_png(root / "images" / f"{fname}.png", img)
                pos = obj.caption(with_subcategory=True, with_attributes=True)
                files[split][fname] = {"file_name": fname + ".png", "class_name": cls,
                                       "file_path": "YOUR_IMAGE_PATH", "positive": pos, "negative": []}
    for split in ("train", "val", "test"):
        (root / "FDRD" / split).mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / "FDRD" / split / f"synth_{split}.json", files[split])
