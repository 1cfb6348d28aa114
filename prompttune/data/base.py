"""Shared data plumbing: image reading with clear errors, transforms, the DataModule base."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


def random_crop_box(w: int, h: int, rng: np.random.Generator, scale: tuple[float, float],
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int] | None:
    """torchvision's RandomResizedCrop box, drawn from ``rng``: up to 10 tries of an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; None when no try fits (callers choose the
    fallback)."""
    for _ in range(10):
        target = w * h * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    return None


class DataError(ValueError):
    """A dataset in the wrong layout, a missing or corrupt file: raised before compute."""


def read_json(path: str | Path, missing: str, what: str = "") -> Any:
    """The JSON document in ``path``, or a :class:`DataError`: ``missing`` when there is no such
    file, ``"<what><path> is not valid JSON: ..."`` when it does not parse (or is not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what}{path} is not valid JSON: {err}") from None


class CorruptImageError(DataError):
    pass


def read_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"corrupt or truncated image {path}: {err}") from None


TRAIN_CROPS = ("random_resized", "resize_random")
INTERPOLATIONS = ("bicubic", "bilinear")


class ImageTransform:
    """Evaluation: Resize (shorter side to ``resize_ratio * size``) + CenterCrop(size), as
    CLIP (ratio 1) and the FGVC protocols (Resize 256 / CenterCrop 224) evaluate. Training with
    ``augment``: ``train_crop="random_resized"``: RandomResizedCrop (scale 0.08-1, aspect
    3/4-4/3: torchvision's, CoOp's and SPT's default) + horizontal flip; ``"resize_random"``:
    Resize(``resize_ratio * size``) + RandomCrop(size) + flip (VPT's ``src/data/transforms.py:21-25``).
    Then normalise. ``interpolation``: bicubic (SPT's ``interpolation=3``) or bilinear
    (torchvision's default, VPT's). Pure PIL + numpy, so it needs no torchvision ops.

    The random generator is per transform object; :func:`_seed_worker` reseeds each
    DataLoader worker's copy (:meth:`reseed`), so workers do not repeat each other's crops.
    """

    def __init__(self, size: int, mean, std, augment: bool = False, seed: int = 0, resize_ratio: float = 1.0,
                 train_crop: str = "random_resized", interpolation: str = "bicubic"):
        if train_crop not in TRAIN_CROPS:
            raise DataError(f"data.train_crop={train_crop!r}: expected one of {', '.join(TRAIN_CROPS)}")
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"data.interpolation={interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        self.size, self.augment, self.ratio = int(size), augment, float(resize_ratio)
        self.train_crop, self.interpolation = train_crop, interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """A fresh generator (one per DataLoader worker: see :func:`_seed_worker`)."""
        self.rng = np.random.default_rng(int(seed))

    def _resize_short(self, img, short: int):
        from PIL import Image

        w, h = img.size
        r = short / min(w, h)
        resample = Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR
        return img.resize((max(short, round(w * r)), max(short, round(h * r))), resample)

    def _random_resized_crop(self, img):
        w, h = img.size
        box = random_crop_box(w, h, self.rng, (0.08, 1.0))
        if box is None:  # fallback: the central square
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return img.crop(box)

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        s = self.size
        if self.augment and self.train_crop == "resize_random":
            img = self._resize_short(img, max(s, int(round(s * self.ratio))))
            w, h = img.size
            x0, y0 = int(self.rng.integers(0, w - s + 1)), int(self.rng.integers(0, h - s + 1))
            img = img.crop((x0, y0, x0 + s, y0 + s))
            if self.rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        elif self.augment:
            resample = Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR
            img = self._random_resized_crop(img).resize((s, s), resample)
            if self.rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = max(s, int(round(s * self.ratio)))
            w, h = img.size
            if (w, h) != (s, s) or short != s:
                img = self._resize_short(img, short)
                w, h = img.size
                x0, y0 = (w - s) // 2, (h - s) // 2
                img = img.crop((x0, y0, x0 + s, y0 + s))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


class ListDataset(Dataset):
    """Items are dicts with at least ``path``; yields ``{"image", "index", ...}``.

    ``on_corrupt``: "error" (default) raises naming the file; "skip" warns once per file
    and substitutes the next readable item, so a run never trains on a silent hole.
    """

    def __init__(self, items: list[dict[str, Any]], transform: Callable, on_corrupt: str = "error",
                 keys: tuple[str, ...] = ("label",)):
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"data.on_corrupt must be 'error' or 'skip', not {on_corrupt!r}")
        self.items, self.transform, self.on_corrupt, self.keys = items, transform, on_corrupt, keys
        self._warned: set[int] = set()
        # False once the module has every row's frozen features cached: rows then carry no pixels
        self.load_images = True

    def __len__(self) -> int:
        return len(self.items)

    def _fields(self, j: int) -> dict[str, Any]:
        return {key: torch.tensor(self.items[j][key]) for key in self.keys if key in self.items[j]}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not self.load_images:
            return {"index": torch.tensor(i), **self._fields(i)}
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            try:
                img = read_image(self.items[j]["path"])
            except CorruptImageError as err:
                if self.on_corrupt == "error":
                    raise
                if j not in self._warned:
                    self._warned.add(j)
                    warnings.warn(f"skipping {err}", stacklevel=2)
                continue
            return {"image": self.transform(img), "index": torch.tensor(j), **self._fields(j)}
        raise DataError("every image in the dataset is unreadable")


class EpochSeededSampler(RandomSampler):
    """A random permutation that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` on samplers that have it, so a run resumed at epoch k
    from a checkpoint shuffles epoch k exactly as the uninterrupted run did. (It is a
    ``RandomSampler``, so under DDP Lightning swaps in a shuffling DistributedSampler.)
    """

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


def check_folder(root: str | Path, what: str, expected: str) -> Path:
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{what} root {root} is a file, not a folder (data.root must name the dataset folder; "
                        f"expected {expected})")
    if not root.is_dir():
        raise DataError(f"{what} folder not found: {root} (expected {expected})")
    if not any(root.iterdir()):
        raise DataError(f"{what} folder is empty: {root} (expected {expected})")
    return root


class PromptDataModule(L.LightningDataModule):
    """Base DataModule: workers, deterministic seeding, transforms from the backbone.

    Subclasses implement :meth:`check` (validate layout before compute, raising
    :class:`DataError`), :meth:`build` (create datasets) and :meth:`info` (what tasks and
    methods need to know: class names, captions, ...).
    """

    def __init__(self, batch_size: int = 32, eval_batch_size: int = 256, num_workers: int = 0,
                 seed: int = 0, augment: bool = False, on_corrupt: str = "error", **kwargs: Any):
        super().__init__()
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.seed, self.augment, self.on_corrupt = int(num_workers), int(seed), augment, on_corrupt
        self.extra = kwargs
        self.image_size, self.mean, self.std = 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.datasets: dict[str, Dataset] = {}

    def configure_for(self, backbone: Any) -> None:
        self.image_size = getattr(backbone, "image_size", self.image_size)
        self.mean = getattr(backbone, "mean", self.mean)
        self.std = getattr(backbone, "std", self.std)

    def transform(self, split: str) -> ImageTransform:
        return ImageTransform(self.image_size, self.mean, self.std,
                              augment=self.augment and split == "train", seed=self.seed)

    def check(self) -> None:
        raise NotImplementedError

    def ensure_synthetic_data(self) -> None:
        """Write the configured synthetic dataset into ``self.root`` (cheap when it is up to date;
        regenerated when its generator version or spec changed)."""
        if getattr(self, "synthetic", None):
            from prompttune.data.image_folder import ensure_synthetic

            ensure_synthetic(self.synthetic, self.root)

    def prepare_root(self, what: str, expected: str) -> Path:
        """The synthetic data if configured, then ``self.root`` checked to exist and be non-empty."""
        self.ensure_synthetic_data()
        return check_folder(self.root, what, expected)

    def build(self) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.build()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.build()
        if split not in self.datasets:
            raise DataError(f"this dataset has no {split!r} split; it has: {', '.join(self.datasets)}")
        ds = self.datasets[split]
        # data.drop_last (CoOp's configs): drop the last partial training batch, as Dassl's
        # build_data_loader does (drop_last=is_train and len(data) >= batch_size)
        drop_last = split == "train" and bool(self.extra.get("drop_last", False)) and len(ds) >= self.batch_size
        return DataLoader(
            ds, batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochSeededSampler(ds, self.seed) if shuffle else None, num_workers=self.num_workers,
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0, worker_init_fn=_seed_worker,
            # the workers' base seed (torch.initial_seed() in each worker) from the data seed alone
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=getattr(self.datasets[split], "collate", None),
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


def _seed_worker(worker_id: int) -> None:
    """Seed a DataLoader worker: the global generators, and the dataset's own transform generator
    (each worker holds a copy of the transform; without this every worker would apply the same
    crop/flip sequence). ``torch.initial_seed()`` here is the loader's base seed + worker id."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(getattr(info, "dataset", None), "transform", None)
    if hasattr(transform, "reseed"):
        transform.reseed(seed)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
