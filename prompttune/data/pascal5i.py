"""Pascal-5i episodes for visual in-context segmentation, in the layout of its public splits.

Layout (the one InMeMo's and HSNet's loaders read)::

    <root>/VOC2012/JPEGImages/<id>.jpg
    <root>/VOC2012/SegmentationClassAug/<id>.png     class index per pixel (255 = boundary)
    <root>/<split_dir>/trn/fold<K>.txt                 one "<id>__<class:02d>" per line
    <root>/<split_dir>/val/fold<K>.txt

``split_dir`` defaults to ``splits/pascal``. The official split files ship inside the official
code: ``evaluate/splits/pascal/{trn,val}/fold{0..3}.txt`` of amirbar/visual_prompting and of
Jackieam/InMeMo (identical lists); either copy that folder to ``<root>/splits/pascal`` or point
``data.split_dir`` at it (an absolute path is used as is: ``data.split_dir=/src/InMeMo/evaluate/splits/pascal``).
For fold K, the training queries and the in-context pool are the lines of ``trn/foldK.txt``
(an image listed under several classes is one line per class); the test episodes are
``episodes`` (1000) passes over ``val/foldK.txt``, as the official evaluation does
(``idx % len(val)``). A query's label is the binary mask of its listed class (white on black),
resized with the image to the canvas cell (``data.interpolation``: bicubic, as
``T.Resize((111, 111), 3)``).

The in-context pair of each query (``pair``) and the label shown for multi-class pool images
(``support_class``) are chosen in ``prompttune/data/icl_pairs.py`` (its docstring cites the
official code); ``prepare_pairs`` runs in the method's setup. ``val_fraction`` holds out
training images as validation queries (for ``select: val``). The synthetic world writes this
layout (``synthetic: {kind: pascal5i}``): 16 classes "<pattern> <shape>", fold K holding the
four shapes of pattern K, with a distractor object of another shape in some scenes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from prompttune.data.base import DataError, PromptDataModule, check_folder, read_image
from prompttune.registry import DATASETS, SYNTHETIC

LINE = re.compile(r"^(?P<id>[^\s/]+)__(?P<cls>\d+)$")


INTERPOLATIONS = ("bicubic", "bilinear")


def _pil_filter(interpolation: str):
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise DataError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")
    return Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR


def resize_image(img, cell: int, interpolation: str = "bicubic") -> torch.Tensor:
    img = img.resize((cell, cell), _pil_filter(interpolation))
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0


def resize_mask(mask: np.ndarray, cell: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Bool mask -> [3, cell, cell] white-on-black in [0, 1] (resized as an 8-bit image, as the
    official ``T.Resize`` + ``ToTensor`` on the 'L'-mode label: bicubic/bilinear, clipped to 0..255)."""
    from PIL import Image

    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((cell, cell), _pil_filter(interpolation))
    m = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()) / 255.0
    return m.clamp(0, 1).unsqueeze(0).expand(3, -1, -1).contiguous()


class EpisodeDataset(Dataset):
    """Episode ``i`` is query ``i % len(queries)`` with its in-context pair from ``pool``.

    ``pairs`` holds one pool index per query, or one per episode (Bar et al.'s per-episode draws).
    """

    def __init__(self, queries: list[dict], pool: list[dict], pairs: list[int], cell: int, load_mask,
                 length: int | None = None, key_offset: int = 0, blank_support: bool = False,
                 interpolation: str = "bicubic"):
        self.length = int(length) if length else len(queries)
        if len(pairs) not in (len(queries), self.length):
            raise DataError(f"{len(pairs)} in-context pairs for {len(queries)} queries / {self.length} episodes")
        self.queries, self.pool, self.pairs, self.cell, self.load_mask = queries, pool, pairs, cell, load_mask
        self.per_episode = len(pairs) == self.length and len(pairs) != len(queries)
        self.key_offset, self.blank_support, self.interpolation = key_offset, blank_support, interpolation

    def __len__(self) -> int:
        return self.length

    def _load(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        img = read_image(item["path"])
        return (resize_image(img, self.cell, self.interpolation),
                resize_mask(self.load_mask(item, img.size), self.cell, self.interpolation))

    def __getitem__(self, i: int) -> dict[str, Any]:
        qi = i % len(self.queries)
        si = self.pairs[i if self.per_episode else qi]
        q, s = self.queries[qi], self.pool[si]
        q_img, q_mask = self._load(q)
        if self.blank_support:  # "no in-context pair": both support cells stay white, like the canvas
            s_img, s_mask = torch.ones_like(q_img), torch.ones_like(q_mask)
        else:
            s_img, s_mask = self._load(s)
        return {"query_image": q_img, "query_mask": q_mask, "support_image": s_img, "support_mask": s_mask,
                "label": torch.tensor(q["class"]), "index": torch.tensor(qi), "support_index": torch.tensor(si),
                "pair_key": torch.tensor(self.key_offset + qi * len(self.pool) + si, dtype=torch.long)}


class EpisodicDataModule(PromptDataModule):
    """Base of the in-context datamodules: queries per split, a support pool, pairs per query.

    Splits: ``train`` (training queries), ``test``, and ``val`` when ``val_fraction`` > 0: that
    share of the training *images* (all lines of an image together, drawn with the run's seed)
    is held out as validation queries for ``select: val``; they leave the training queries and
    the pool. The pool is the training list.
    """

    kind = "segmentation"
    default_interpolation = "bicubic"

    def __init__(self, root: str, episodes: int = 1000, train_limit: int = 0, synthetic: dict | None = None,
                 pair: str = "retrieved", class_matched: bool = False, retriever: str = "zoo_clip",
                 retriever_weights: str | None = None, pair_seed: int | None = None,
                 support_class: str = "official", val_fraction: float = 0.0, interpolation: str | None = None,
                 **kw: Any):
        super().__init__(**kw)
        from prompttune.data.icl_pairs import PAIR_CHOICES, SUPPORT_CLASS_CHOICES

        if pair not in PAIR_CHOICES:
            raise DataError(f"data.pair must be one of {', '.join(PAIR_CHOICES)}, not {pair!r}")
        if support_class not in SUPPORT_CLASS_CHOICES:
            raise DataError(f"data.support_class must be one of {', '.join(SUPPORT_CLASS_CHOICES)}, "
                            f"not {support_class!r}")
        if not 0 <= float(val_fraction) < 1:
            raise DataError(f"data.val_fraction must be in [0, 1), not {val_fraction!r}")
        self.interpolation = interpolation or self.default_interpolation
        _pil_filter(self.interpolation)
        self.pair, self.class_matched, self.retriever = pair, bool(class_matched), retriever
        self.retriever_weights, self.pair_seed, self.support_class = retriever_weights, pair_seed, support_class
        self.val_fraction = float(val_fraction)
        self.root = Path(root).expanduser() if root else None
        self.episodes, self.train_limit = int(episodes), int(train_limit)
        self.synthetic = dict(synthetic) if synthetic else None
        self._items: dict[str, list[dict]] = {}
        self._pairs: dict[str, list[int]] = {}
        self._pair_pool: dict[str, str] = {}  # split -> the list its pairs index ("pool" or the split itself)
        self.cell = 111

    def configure_for(self, backbone: Any) -> None:
        super().configure_for(backbone)
        geom = getattr(backbone, "geometry", None)
        if geom is not None:
            self.cell = geom.cell

    # -- what subclasses provide
    def read_items(self) -> dict[str, list[dict]]:
        """{"pool": [...], "train": [...], "test": [...]}; items: id, path, class, + what load_mask needs."""
        raise NotImplementedError

    def load_mask(self, item: dict, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    # -- the contract
    def check(self) -> None:
        if self.root is None:
            raise DataError(f"data.root is not set for {type(self).__name__}")
        self.ensure_synthetic_data()
        self._items = self.read_items()
        for split in ("pool", "train", "test"):
            if not self._items.get(split):
                raise DataError(f"{self.root}: the {split!r} split has no usable items")
        rng = np.random.default_rng(self.seed)
        if self.val_fraction:
            ids = sorted({it["id"] for it in self._items["train"]})
            n_val = max(1, int(round(self.val_fraction * len(ids))))
            if n_val >= len(ids):
                raise DataError(f"data.val_fraction={self.val_fraction} leaves no training image "
                                f"({len(ids)} images)")
            held = set(rng.choice(ids, size=n_val, replace=False).tolist())
            self._items["val"] = [it for it in self._items["train"] if it["id"] in held]
            self._items["train"] = [it for it in self._items["train"] if it["id"] not in held]
            self._items["pool"] = [it for it in self._items["pool"] if it["id"] not in held]
        if self.train_limit:
            tr = self._items["train"]
            keep = sorted(rng.choice(len(tr), size=min(self.train_limit, len(tr)), replace=False))
            self._items["train"] = [tr[i] for i in keep]
        read_image(self._items["test"][0]["path"])  # a corrupt first image fails now, not mid-run

    def query_splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if s in self._items]

    def _view(self, items: list[dict]) -> dict[str, list]:
        return {"ids": [it["id"] for it in items], "paths": [it["path"] for it in items],
                "classes": [int(it["class"]) for it in items]}

    def pool(self) -> dict[str, list]:
        if not self._items:
            self.check()
        return self._view(self._items["pool"])

    def queries(self, split: str) -> dict[str, list]:
        if not self._items:
            self.check()
        return self._view(self._items[split])

    def n_episodes(self, split: str) -> int:
        return self.episodes if split == "test" and self.episodes else len(self._items[split])

    def prepare_pairs(self, backbone_weights: str | None = None) -> None:
        """Choose every query's in-context pair (``data.pair``); similarities cached per image set."""
        from prompttune.data.icl_pairs import build_retriever, pool_images, random_same_class_pairs, select_pairs, similarity

        if not self._items:
            self.check()
        seed = self.seed if self.pair_seed is None else int(self.pair_seed)
        splits = self.query_splits()
        if self.pair == "random_same_class":  # Bar et al.: per episode, from the query's own list
            for split in splits:
                q = self.queries(split)
                n = self.n_episodes(split) if split != "train" else len(q["ids"])
                self.assign_pairs(split, random_same_class_pairs(q["ids"], q["classes"], n, seed), pool=split)
            return
        rw = self.retriever_weights or backbone_weights
        retriever = build_retriever(self.retriever, rw) if self.pair == "retrieved" else None
        key = f"{self.retriever}:{rw}"
        pool = self.pool()
        ids, _, _ = pool_images(pool["ids"], pool["classes"])
        path_of = dict(zip(pool["ids"], pool["paths"]))
        for split in splits:
            q = self.queries(split)
            sims = similarity(retriever, key, q["paths"], [path_of[i] for i in ids]) if retriever else None
            strategy = "random" if self.pair == "none" else self.pair
            self.assign_pairs(split, select_pairs(strategy, q["ids"], q["classes"], pool["ids"], pool["classes"],
                                                  self.class_matched, seed + (split == "train"), sims=sims,
                                                  training=split == "train", support_class=self.support_class))

    def assign_pairs(self, split: str, pool_index: list[int], pool: str = "pool") -> None:
        """Set the pairs of ``split``: indices into ``pool`` (the pool list, or a split's own list),
        one per query or one per episode."""
        n, m = len(self._items[split]), len(self._items[pool])
        if len(pool_index) not in (n, self.n_episodes(split)) or any(not 0 <= int(i) < m for i in pool_index):
            raise DataError(f"assign_pairs({split!r}): need {n} pool indices in [0, {m})")
        self._pairs[split] = [int(i) for i in pool_index]
        self._pair_pool[split] = pool
        self.datasets.pop(split, None)

    def build(self) -> None:
        if not self._items:
            self.check()
        rng = np.random.default_rng(self.seed)
        for code, split in enumerate(self.query_splits()):
            q = self._items[split]
            pool = self._items[self._pair_pool.get(split, "pool")]
            pairs = self._pairs.get(split)
            if pairs is None:  # no method chose: a random pool item per query
                pairs = [int(rng.integers(len(pool))) for _ in q]
            self.datasets[split] = EpisodeDataset(q, pool, pairs, self.cell, self.load_mask, self.n_episodes(split),
                                                  key_offset=code * 10 ** 12, blank_support=self.pair == "none",
                                                  interpolation=self.interpolation)

    def setup(self, stage: str | None = None) -> None:
        if any(s not in self.datasets for s in self.query_splits()):
            self.build()

    def _loader(self, split, shuffle):
        if split not in self.datasets:
            if split == "val" and "val" not in self._items:
                raise DataError("this in-context dataset has no validation split: set data.val_fraction "
                                "(e.g. 0.1) to hold out training images as validation queries")
            self.build()
        return super()._loader(split, shuffle)

    def info(self) -> dict[str, Any]:
        return {"classnames": getattr(self, "classnames", []), "cell": self.cell, "pair": self.pair,
                "kind": self.kind}


@DATASETS.register("pascal5i")
class Pascal5iDataModule(EpisodicDataModule):
    def __init__(self, root: str, fold: int = 0, split_dir: str = "splits/pascal", image_dir: str = "VOC2012/JPEGImages",
                 mask_dir: str = "VOC2012/SegmentationClassAug", **kw: Any):
        super().__init__(root, **kw)
        if int(fold) not in (0, 1, 2, 3):
            raise DataError(f"data.fold must be 0, 1, 2 or 3, not {fold!r}")
        self.fold, self.split_dir, self.image_dir, self.mask_dir = int(fold), split_dir, image_dir, mask_dir
        self.classnames: list[str] = []

    def _read_split(self, name: str) -> list[dict]:
        path = self.root / self.split_dir / name / f"fold{self.fold}.txt"
        if not path.is_file():
            raise DataError(f"Pascal-5i split file not found: {path} (expected lines '<image id>__<class 01-20>', "
                            f"as evaluate/splits/pascal/{name}/fold{self.fold}.txt of the official code)")
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            m = LINE.match(line)
            if not m:
                raise DataError(f"{path}, line {n}: {line!r} is not '<image id>__<class number>'")
            iid, cls = m["id"], int(m["cls"])
            if cls < 1:
                raise DataError(f"{path}, line {n}: class {cls} must be >= 1 (0 is background)")
            items.append({"id": iid, "class": cls - 1, "path": str(self.root / self.image_dir / f"{iid}.jpg"),
                          "mask": str(self.root / self.mask_dir / f"{iid}.png")})
        missing = [it for it in items if not (Path(it["path"]).is_file() and Path(it["mask"]).is_file())]
        if missing:
            it = missing[0]
            raise DataError(f"{path} lists {len(missing)} images without their files, e.g. {it['path']} and "
                            f"{it['mask']}")
        return items

    def read_items(self) -> dict[str, list[dict]]:
        check_folder(self.root, "Pascal-5i", f"{self.image_dir}/, {self.mask_dir}/ and {self.split_dir}/")
        for sub in (self.image_dir, self.mask_dir):
            if not (self.root / sub).is_dir():
                raise DataError(f"Pascal-5i folder not found: {self.root / sub}")
        trn, val = self._read_split("trn"), self._read_split("val")
        names = _class_names(self.root)
        self.classnames = names
        return {"pool": trn, "train": trn, "test": val}

    def load_mask(self, item: dict, size: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(item["mask"]) as im:
                m = np.asarray(im)
        except (OSError, ValueError) as err:
            raise DataError(f"corrupt mask {item['mask']}: {err}") from None
        if m.ndim != 2:
            raise DataError(f"mask {item['mask']} must be a single-channel class-index PNG, got shape {m.shape}")
        if m.shape[::-1] != tuple(size):
            raise DataError(f"mask {item['mask']} is {m.shape[::-1]} but its image is {tuple(size)}")
        return m == item["class"] + 1


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _class_names(root: Path) -> list[str]:
    f = root / "classnames.txt"  # the synthetic world writes its names; real Pascal uses VOC's
    return f.read_text().split("\n")[:-1] if f.is_file() else list(VOC_CLASSES)


# ------------------------------------------------------------------ the synthetic world
def synthetic_classes() -> list[str]:
    """16 classes; fold K = the four shapes with pattern K (class id 4K + shape + 1)."""
    from prompttune.data.world import CATEGORIES, SUBCATEGORIES

    return [f"{SUBCATEGORIES[f]} {c}" for f in range(4) for c in CATEGORIES]


def icl_scene(rng: np.random.Generator, cls: int, side: int, distractor_prob: float = 0.5,
              background: str = "noise"):
    """A scene with one object of class ``cls`` (0-based) and maybe a distractor of another shape.

    Returns the image [side, side, 3] uint8, the class-index map (0 background, id+1 objects)
    and the objects.
    """
    from prompttune.data.world import CATEGORIES, SUBCATEGORIES, render, sample_object

    fold, shape = divmod(cls, 4)
    objs = [sample_object(rng, category=CATEGORIES[shape], subcategory=SUBCATEGORIES[fold])]
    if rng.random() < distractor_prob:
        other = [c for c in range(4) if c != shape][rng.integers(3)]
        o2 = sample_object(rng, category=CATEGORIES[other], subcategory=SUBCATEGORIES[rng.integers(4)], size="small")
        for _ in range(20):  # keep the target mostly visible: distractors go away from it
            if np.hypot(o2.cx - objs[0].cx, o2.cy - objs[0].cy) > 0.8 * (o2.radius + objs[0].radius):
                break
            o2 = sample_object(rng, category=o2.category, subcategory=o2.subcategory, size="small")
        objs.append(o2)
    img, masks = render(objs, side, rng, background)
    cmap = np.zeros((side, side), dtype=np.uint8)
    for o, m in zip(objs, masks):
        cmap[m] = SUBCATEGORIES.index(o.subcategory) * 4 + CATEGORIES.index(o.category) + 1
    return img, cmap, objs


def synthetic_icl_pairs(n: int, cell: int, seed: int = 0, side: int = 48, distractor_prob: float = 0.5):
    """In-memory (support image, support mask, query image, query mask) tensors of same-class pairs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = [[], [], [], []]
    for _ in range(n):
        cls = int(rng.integers(16))
        for k in (0, 2):
            img, cmap, _ = icl_scene(rng, cls, side, distractor_prob)
            out[k].append(resize_image(Image.fromarray(img), cell))
            out[k + 1].append(resize_mask(cmap == cls + 1, cell))
    return tuple(torch.stack(o) for o in out)


@SYNTHETIC.register("pascal5i")
def write_pascal5i(root: Path, n_train: int = 40, n_val: int = 20, side: int = 48, seed: int = 0,
                   distractor_prob: float = 0.5, background: str = "noise") -> None:
    """Per fold: ``n_train`` trn and ``n_val`` val images (balanced over its four classes)."""
    from PIL import Image

    root = Path(root)
    img_dir, mask_dir = root / "VOC2012" / "JPEGImages", root / "VOC2012" / "SegmentationClassAug"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = 0
    for fold in range(4):
        for split, n in (("trn", n_train), ("val", n_val)):
            lines = []
            for i in range(n):
                cls = fold * 4 + i % 4
                img, cmap, _ = icl_scene(rng, cls, side, distractor_prob, background)
                iid = f"2099_{k:06d}"
                k += 1
                Image.fromarray(img).save(img_dir / f"{iid}.jpg", quality=95)
                Image.fromarray(cmap).save(mask_dir / f"{iid}.png")
                lines.append(f"{iid}__{cls + 1:02d}")
            f = root / "splits" / "pascal" / split / f"fold{fold}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("\n".join(lines) + "\n")
    (root / "classnames.txt").write_text("\n".join(synthetic_classes()) + "\n")
