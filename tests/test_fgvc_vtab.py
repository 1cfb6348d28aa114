"""FGVC (CUB/NABirds, VPT json, SPT lists) and VTAB-1k loaders: layouts, labels, transforms, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prompttune.data.base import DataError
from prompttune.data.base import ImageTransform
from prompttune.data.fgvc import FGVCDataModule, write_cub
from prompttune.data.vtab import VTABDataModule, write_vtab


def _img(path, value=128, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def dm(cls, **kw):
    d = cls(seed=0, batch_size=4, **kw)
    d.image_size, d.mean, d.std = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return d


def test_synthetic_cub_layout_read_by_the_real_loader(tmp_path):
    write_cub(tmp_path, n_train=2, n_test=1, side=8)
    d = dm(FGVCDataModule, root=str(tmp_path))
    d.check()
    assert d.detected_layout == "cub" and d.num_classes == 16
    assert len(d.splits["train"]) == 32 and len(d.splits["test"]) == 16
    assert d.info()["classnames"][0].startswith("001.")
    d.build()
    batch = next(iter(d.train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].dtype == torch.int64


def test_nabirds_style_ids_are_remapped(tmp_path):
    for i, (cls, train) in enumerate([(817, 1), (295, 1), (817, 0), (1010, 1), (295, 0)]):
        _img(tmp_path / "images" / f"{cls}" / f"{i}.jpg")
    (tmp_path / "images.txt").write_text("".join(f"id{i} {c}/{i}.jpg\n" for i, c in enumerate([817, 295, 817, 1010, 295])))
    (tmp_path / "image_class_labels.txt").write_text("".join(f"id{i} {c}\n" for i, c in enumerate([817, 295, 817, 1010, 295])))
    (tmp_path / "train_test_split.txt").write_text("id0 1\nid1 1\nid2 0\nid3 1\nid4 0\n")
    d = dm(FGVCDataModule, root=str(tmp_path))
    d.check()
    assert d.num_classes == 3  # 295 -> 0, 817 -> 1, 1010 -> 2
    assert sorted(d.splits["train"]) == [("images/1010/3.jpg", 2), ("images/295/1.jpg", 0), ("images/817/0.jpg", 1)]


def test_vpt_json_and_list_layouts(tmp_path):
    for i in range(4):
        _img(tmp_path / "imgs" / f"{i}.png")
    for split, rows in (("train", {"0.png": 0, "1.png": 1}), ("val", {"2.png": 0}), ("test", {"3.png": 1})):
        (tmp_path / f"{split}.json").write_text(json.dumps(rows))
    d = dm(FGVCDataModule, root=str(tmp_path), image_dir="imgs")
    d.check()
    assert d.detected_layout == "vpt_json" and len(d.splits["val"]) == 1
    (tmp_path / "tr.txt").write_text("0.png 0\n1.png 1\n")
    (tmp_path / "te.txt").write_text("3.png 1\n")
    d = dm(FGVCDataModule, root=str(tmp_path), image_dir="imgs", layout="list", train_list="tr.txt", test_list="te.txt")
    d.check()
    assert d.splits["test"] == [("imgs/3.png", 1)]


def test_fgvc_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="layout must be one of"):
        FGVCDataModule(root=str(tmp_path), layout="voc")
    with pytest.raises(DataError, match="FGVC dataset folder not found"):
        dm(FGVCDataModule, root=str(tmp_path / "none")).check()
    _img(tmp_path / "x" / "a.png")
    with pytest.raises(DataError, match="cannot tell the FGVC layout"):
        dm(FGVCDataModule, root=str(tmp_path)).check()
    write_cub(tmp_path / "cub", n_train=1, n_test=1, side=8)
    (tmp_path / "cub" / "images" / "001.plain_disc").rename(tmp_path / "cub" / "images" / "moved")
    with pytest.raises(DataError, match="missing images"):
        dm(FGVCDataModule, root=str(tmp_path / "cub")).check()
    (tmp_path / "cub" / "train_test_split.txt").write_text("1 yes\n")
    with pytest.raises(DataError, match="is_training flag must be an integer"):
        dm(FGVCDataModule, root=str(tmp_path / "cub")).check()
    (tmp_path / "t.txt").write_text("0.png\n")
    with pytest.raises(DataError, match="line 1: expected two fields"):
        dm(FGVCDataModule, root=str(tmp_path), layout="list", train_list="t.txt", test_list="t.txt").check()


def test_fgvc_transforms():
    img = Image.fromarray(np.arange(16 * 32 * 3, dtype=np.uint8).reshape(16, 32, 3) % 251)
    ev = ImageTransform(8, (0, 0, 0), (1, 1, 1), augment=False, resize_ratio=2.0)  # Resize(16) + CenterCrop(8)
    want = np.asarray(img.resize((32, 16), Image.BICUBIC).crop((12, 4, 20, 12)), dtype=np.float32) / 255
    torch.testing.assert_close(ev(img), torch.from_numpy(want).permute(2, 0, 1))
    tr = ImageTransform(8, (0, 0, 0), (1, 1, 1), augment=True, seed=0)
    outs = [tr(img) for _ in range(4)]
    assert outs[0].shape == (3, 8, 8) and not all(torch.equal(outs[0], o) for o in outs[1:])


def test_vtab_lists_and_modes(tmp_path):
    write_vtab(tmp_path, n_train=20, n_val=6, n_test=10, side=8, seed=1)
    d = dm(VTABDataModule, root=str(tmp_path))
    d.check()
    assert len(d.splits["train"]) == 26 and len(d.splits["test"]) == 10
    t = dm(VTABDataModule, root=str(tmp_path), mode="tune")
    t.check()
    assert len(t.splits["train"]) == 20 and len(t.splits["test"]) == 6
    d.build()
    assert next(iter(d.test_dataloader()))["image"].shape[1:] == (3, 8, 8)
    with pytest.raises(DataError, match="mode must be one of final, tune"):
        VTABDataModule(root=str(tmp_path), mode="train")
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt not found"):
        dm(VTABDataModule, root=str(tmp_path)).check()


def test_mat_layouts_need_scipy_or_read_it(tmp_path):
    (tmp_path / "imagelabels.mat").write_bytes(b"")
    d = dm(FGVCDataModule, root=str(tmp_path))
    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs scipy"):
            d.check()
    else:
        with pytest.raises(DataError, match="could not read"):
            d.check()
