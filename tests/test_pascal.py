"""Pascal-5i and VOC-detection loaders: real layouts (written by the synthetic world), errors before compute."""

from __future__ import annotations

import prompttune._tvshim  # noqa: F401

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompttune.data.base import DataError
from prompttune.data.image_folder import ensure_synthetic
from prompttune.data.pascal5i import Pascal5iDataModule
from prompttune.data.voc_detection import VOCDetectionDataModule


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pascal")
    ensure_synthetic({"kind": "pascal5i", "n_train": 8, "n_val": 4, "side": 32, "seed": 0}, root)
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    ensure_synthetic({"kind": "voc_detection", "n_train": 20, "n_val": 30, "side": 32, "seed": 0,
                      "multi_frac": 0.3}, root)
    return root


def test_pascal_layout_and_episodes(pascal_root):
    lines = (pascal_root / "splits/pascal/val/fold1.txt").read_text().split()
    assert len(lines) == 4 and all(l.split("__")[1] in {"05", "06", "07", "08"} for l in lines)
    dm = Pascal5iDataModule(str(pascal_root), fold=1, episodes=10, seed=0)
    dm.cell = 15
    dm.check()
    assert len(dm.queries("test")["ids"]) == 4 and len(dm.pool()["ids"]) == 8
    dm.assign_pairs("test", [0, 1, 2, 3])
    dm.build()
    ds = dm.datasets["test"]
    assert len(ds) == 10  # episodes cycle over the val list, as idx % len(val)
    it = ds[5]
    assert it["query_image"].shape == (3, 15, 15) and it["query_mask"].shape == (3, 15, 15)
    assert int(it["index"]) == 1 and int(it["support_index"]) == 1
    # the label is the listed class's pixels (class ids 5..8 -> 0-based 4..7 for fold 1)
    iid, cls = lines[1].split("__")
    cmap = np.asarray(Image.open(pascal_root / "VOC2012/SegmentationClassAug" / f"{iid}.png"))
    m = dm.load_mask(dm._items["test"][1], (32, 32))
    assert np.array_equal(m, cmap == int(cls)) and m.sum() > 0
    assert int(it["label"]) == int(cls) - 1
    batch = next(iter(dm.test_dataloader()))
    assert batch["support_image"].shape[1:] == (3, 15, 15) and batch["pair_key"].dtype == torch.long


def test_pascal_errors_name_the_problem(pascal_root, tmp_path):
    with pytest.raises(DataError, match="fold must be 0, 1, 2 or 3"):
        Pascal5iDataModule(str(pascal_root), fold=4)
    with pytest.raises(DataError, match="Pascal-5i folder not found|folder not found"):
        Pascal5iDataModule(str(tmp_path / "missing")).check()
    bad = tmp_path / "bad"
    (bad / "VOC2012/JPEGImages").mkdir(parents=True)
    (bad / "VOC2012/SegmentationClassAug").mkdir(parents=True)
    with pytest.raises(DataError, match=r"split file not found: .*trn/fold0.txt"):
        Pascal5iDataModule(str(bad)).check()
    (bad / "splits/pascal/trn").mkdir(parents=True)
    (bad / "splits/pascal/trn/fold0.txt").write_text("2007_000032 1\n")
    with pytest.raises(DataError, match=r"line 1: '2007_000032 1' is not '<image id>__<class number>'"):
        Pascal5iDataModule(str(bad)).check()
    (bad / "splits/pascal/trn/fold0.txt").write_text("2007_000032__01\n")
    with pytest.raises(DataError, match=r"lists 1 images without their files, e.g. .*2007_000032.jpg"):
        Pascal5iDataModule(str(bad)).check()
    dm = Pascal5iDataModule(str(pascal_root), fold=0)
    dm.check()
    with pytest.raises(DataError, match=r"assign_pairs\('test'\): need 4 pool indices in \[0, 8\)"):
        dm.assign_pairs("test", [0, 99, 0, 0])


def test_corrupt_mask_is_reported(pascal_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(pascal_root, root)
    dm = Pascal5iDataModule(str(root), fold=0)
    dm.check()
    item = dm._items["test"][0]
    Path(item["mask"]).write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt mask"):
        dm.load_mask(item, (32, 32))


def test_voc_detection_filters_and_box_masks(voc_root):
    dm = VOCDetectionDataModule(str(voc_root), max_area_frac=0.2, seed=0)
    dm.check()
    n_train_listed = len((voc_root / "VOC2012/ImageSets/Main/train.txt").read_text().split())
    pool = dm._items["pool"]
    assert 0 < len(pool) < n_train_listed  # multi-object images dropped
    from prompttune.data.voc_detection import parse_voc_xml

    for it in pool:
        assert len(parse_voc_xml(voc_root / "VOC2012/Annotations" / f"{it['id']}.xml")["objects"]) == 1
    for it in dm._items["test"]:
        x0, y0, x1, y1 = it["box"]
        assert (x1 - x0) * (y1 - y0) / (32 * 32) < 0.2
    it = pool[0]
    m = dm.load_mask(it, (32, 32))
    x0, y0, x1, y1 = (int(v) for v in it["box"])
    assert m.sum() == (x1 - max(x0, 0)) * (y1 - max(y0, 0)) and m[y0 + 1, x0 + 1]


def test_voc_detection_errors(voc_root, tmp_path):
    import shutil

    root = tmp_path / "v"
    shutil.copytree(voc_root, root)
    first = (root / "VOC2012/ImageSets/Main/val.txt").read_text().split()[0]
    (root / "VOC2012/Annotations" / f"{first}.xml").write_text("<annotation><size>")
    with pytest.raises(DataError, match="is not valid VOC XML"):
        VOCDetectionDataModule(str(root)).check()
    (root / "VOC2012/ImageSets/Main/val.txt").unlink()
    with pytest.raises(DataError, match=r"VOC image list not found: .*val.txt"):
        VOCDetectionDataModule(str(root)).check()
