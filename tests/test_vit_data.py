"""FGVC / VTAB protocol details of issue 13: VPT's JSON label remap, VPT's augmentation, validation
splits for `select: val`, and augmentation that differs across DataLoader workers (items 7, 14, 15, 16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from prompttune.data.base import DataError, ImageTransform
from prompttune.data.fgvc import FGVCDataModule, hold_out, write_cub
from prompttune.data.vtab import VTABDataModule, write_vtab

ROOT = Path(__file__).resolve().parents[1]


def _img(path, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def dm(cls, **kw):
    d = cls(seed=0, batch_size=4, **kw)
    d.image_size, d.mean, d.std = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return d


def test_vpt_json_sparse_ids_are_remapped_like_vpt(tmp_path):
    # NABirds-style ids (sparse, large): VPT maps sorted ids to 0..C-1 (json_dataset.py:59-66)
    train = {"a/0.jpg": 817, "a/1.jpg": 295, "a/2.jpg": 1010, "a/3.jpg": 295}
    test = {"a/4.jpg": 1010, "a/5.jpg": 817}
    for name in list(train) + list(test):
        _img(tmp_path / "images" / name)
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    d = dm(FGVCDataModule, root=str(tmp_path), image_dir="images")
    d.check()
    assert d.num_classes == 3
    assert dict(d.splits["train"]) == {"images/a/0.jpg": 1, "images/a/1.jpg": 0, "images/a/2.jpg": 2, "images/a/3.jpg": 0}
    assert dict(d.splits["test"]) == {"images/a/4.jpg": 2, "images/a/5.jpg": 1}
    (tmp_path / "test.json").write_text(json.dumps({"a/4.jpg": 4242}))
    with pytest.raises(DataError, match=r"test.json: class ids \[4242\] do not occur in train.json"):
        dm(FGVCDataModule, root=str(tmp_path), image_dir="images").check()


@pytest.mark.parametrize("name,image_dir", [("cub", "images"), ("nabirds", "images"), ("dogs", "Images"),
                                            ("cars", "."), ("flowers", ".")])
def test_fgvc_configs_use_vpts_image_folders(name, image_dir):
    # VPT's get_imagedir (src/data/datasets/json_dataset.py:126-173)
    cfg = OmegaConf.load(ROOT / "configs" / "data" / f"fgvc_{name}.yaml")
    assert cfg.image_dir == image_dir


def test_vpt_augmentation_is_resize_then_random_crop():
    img = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3) % 251)
    tf = ImageTransform(8, (0, 0, 0), (1, 1, 1), augment=True, seed=3, resize_ratio=1.5,
                        train_crop="resize_random", interpolation="bilinear")
    resized = np.asarray(img.resize((18, 12), Image.BILINEAR), dtype=np.float32) / 255  # Resize(12): shorter side
    rng = np.random.default_rng(3)  # the same draws, by hand: x0, y0, then the flip coin
    x0, y0 = int(rng.integers(0, 18 - 8 + 1)), int(rng.integers(0, 12 - 8 + 1))
    want = resized[y0:y0 + 8, x0:x0 + 8]
    if rng.random() < 0.5:
        want = want[:, ::-1]
    torch.testing.assert_close(tf(img), torch.from_numpy(want.copy()).permute(2, 0, 1))
    with pytest.raises(DataError, match="data.train_crop='center': expected one of random_resized, resize_random"):
        ImageTransform(8, (0, 0, 0), (1, 1, 1), train_crop="center")


def test_hold_out_is_per_class_seeded_and_disjoint():
    rows = [(f"{c}/{i}.jpg", c) for c in range(4) for i in range(10)]
    tr, va = hold_out(rows, 0.2, seed=0)
    assert len(va) == 8 and sorted(np.bincount([c for _, c in va]).tolist()) == [2, 2, 2, 2]
    assert not set(tr) & set(va) and len(tr) + len(va) == len(rows)
    assert hold_out(rows, 0.2, seed=0) == (tr, va) and hold_out(rows, 0.2, seed=1)[1] != va


def test_val_split_for_select_val(tmp_path):
    write_cub(tmp_path / "cub", n_train=5, n_test=1, side=8)
    d = dm(FGVCDataModule, root=str(tmp_path / "cub"))
    with pytest.raises(DataError, match="has no validation split: set data.val_fraction"):
        d.val_dataloader()
    d = dm(FGVCDataModule, root=str(tmp_path / "cub"), val_fraction=0.2)
    d.setup("fit")
    assert len(d.splits["val"]) == 16 and len(d.splits["train"]) == 64  # one of five per class
    assert next(iter(d.val_dataloader()))["image"].shape == (16, 3, 8, 8)  # eval_batch_size 256
    with pytest.raises(DataError, match=r"data.val_fraction=1.0: expected a number in \[0, 1\)"):
        FGVCDataModule(root=str(tmp_path), val_fraction=1.0)
    write_vtab(tmp_path / "vtab", n_train=16, n_val=8, n_test=8, side=8, seed=1)
    v = dm(VTABDataModule, root=str(tmp_path / "vtab"), mode="holdout")
    v.setup("fit")
    assert (len(v.splits["train"]), len(v.splits["val"]), len(v.splits["test"])) == (16, 8, 8)
    with pytest.raises(DataError, match="use data.mode=holdout"):
        dm(VTABDataModule, root=str(tmp_path / "vtab")).val_dataloader()


class SameImage(torch.utils.data.Dataset):
    """Every item is the same picture: any difference between items is the augmentation's."""

    def __init__(self, path, n=8):
        self.img, self.n = Image.open(path).convert("RGB"), n
        self.transform = ImageTransform(8, (0, 0, 0), (1, 1, 1), augment=True, seed=0)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": self.transform(self.img), "index": torch.tensor(i)}


def _batches(path, workers, seed=0):
    from prompttune.data.base import PromptDataModule

    d = PromptDataModule(batch_size=2, eval_batch_size=2, num_workers=workers, seed=seed)
    d.datasets = {"test": SameImage(path)}
    return [b["image"] for b in d.test_dataloader()]


def test_each_worker_draws_its_own_augmentation_reproducibly(tmp_path):
    _img(tmp_path / "x.png", size=(24, 20))
    two = _batches(tmp_path / "x.png", workers=2)
    # batch 0 comes from worker 0, batch 1 from worker 1: before reseeding they were identical
    assert not torch.equal(two[0], two[1])
    assert all(torch.equal(a, b) for a, b in zip(two, _batches(tmp_path / "x.png", workers=2)))  # same seed
    other = _batches(tmp_path / "x.png", workers=2, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(two, other))
