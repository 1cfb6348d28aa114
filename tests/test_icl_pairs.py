"""In-context pair selection as the official code does it: multi-class pool images, the timm
token-feature retriever, Bar et al.'s per-episode random support, VOC's bilinear resize, the
held-out validation split."""

from __future__ import annotations

import prompttune._tvshim  # noqa: F401

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompttune.data.icl_pairs import (TimmTokenRetriever, pool_images, random_same_class_pairs, select_pairs,
                                       similarity)
from prompttune.data.base import DataError
from prompttune.data.image_folder import ensure_synthetic
from prompttune.data.pascal5i import Pascal5iDataModule


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTTUNE_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pascal")
    ensure_synthetic({"kind": "pascal5i", "n_train": 8, "n_val": 4, "side": 32, "seed": 0}, root)
    return root


def test_multi_class_pool_images_take_the_official_label():
    # pool lines as a trn list: image "p" listed under classes 3 then 5 (fold-2-like duplicate)
    pool_ids, pool_cls = ["p", "r", "p"], [3, 7, 5]
    ids, listed, line = pool_images(pool_ids, pool_cls)
    assert ids == ["p", "r"] and listed == [[3, 5], [7]] and line[("p", 5)] == 2
    sims = torch.tensor([[0.9, 0.1]] * 3)  # every query retrieves "p"
    q_ids, q_cls = ["a", "b", "c"], [3, 5, 9]
    # evaluation: the last listed class (val_pascal_dataloader.get_top50_images_trn overwrites per line)
    assert select_pairs("retrieved", q_ids, q_cls, pool_ids, pool_cls, False, 0, sims=sims) == [2, 2, 2]
    # training: the query's class when listed, else the first listed (sample_episode_for_training)
    assert select_pairs("retrieved", q_ids, q_cls, pool_ids, pool_cls, False, 0, sims=sims, training=True) == [0, 2, 0]
    # the project's older rule, still selectable
    assert select_pairs("retrieved", q_ids, q_cls, pool_ids, pool_cls, False, 0, sims=sims,
                        support_class="first") == [0, 0, 0]
    # class-matched: only images listing the query's class; that class's label is shown
    assert select_pairs("retrieved", ["a", "z"], [7, 3], pool_ids, pool_cls, True, 0,
                        sims=torch.tensor([[0.9, 0.1], [0.1, 0.9]])) == [1, 0]
    # the query itself is never its own pair, whichever of its lines it comes from
    assert select_pairs("retrieved", ["p"], [5], pool_ids, pool_cls, False, 0, sims=sims[:1]) == [1]
    with pytest.raises(ValueError, match=r"need a \[1, 2\] similarity matrix"):
        select_pairs("retrieved", ["p"], [5], pool_ids, pool_cls, False, 0, sims=torch.zeros(1, 3))


def test_duplicated_pool_lines_in_a_real_split_file(pascal_root, tmp_path):
    """A trn list repeating images under a second class (as fold 2's 853 images): ranked once,
    the support label follows the official rule in the datamodule."""
    root = tmp_path / "dup"
    shutil.copytree(pascal_root, root)
    trn = root / "splits/pascal/trn/fold0.txt"
    lines = trn.read_text().split()
    extra = [f"{ln.split('__')[0]}__{(int(ln.split('__')[1]) % 4) + 1:02d}" for ln in lines[:4]]  # a second class
    trn.write_text("\n".join(lines[:4] + extra + lines[4:]) + "\n")
    dm = Pascal5iDataModule(str(root), fold=0, pair="random", seed=0)
    dm.cell = 15
    dm.prepare_pairs()
    pool = dm._items["pool"]
    ids, listed, _ = pool_images([it["id"] for it in pool], [it["class"] for it in pool])
    assert len(ids) == len(lines) and sum(len(c) > 1 for c in listed) == 4
    for split in ("train", "test"):
        for qi, si in enumerate(dm._pairs[split]):
            s, q = pool[si], dm._items[split][qi]
            mine = listed[ids.index(s["id"])]
            if split == "test":
                assert s["class"] == mine[-1]
            else:
                assert s["class"] == (q["class"] if q["class"] in mine else mine[0])
                assert s["id"] != q["id"]


def _bar_transcription(names, classes, n, seed):
    """evaluate/pascal_dataloader.py sample_episode with the global stream seeded once."""
    np.random.seed(seed)
    classwise: dict[int, list[str]] = {}
    for nm, c in zip(names, classes):
        classwise.setdefault(c, []).append(nm)
    out = []
    for idx in range(n):
        q, c = names[idx % len(names)], classes[idx % len(names)]
        while True:
            s = np.random.choice(classwise[c], 1, replace=False)[0]
            if q != s:
                break
        out.append((s, c))
    return out


def test_random_same_class_reproduces_bar_et_al_episodes(tmp_path):
    names = [f"im{i}" for i in range(10)] + ["im0"]
    classes = [0, 1, 0, 1, 0, 1, 2, 2, 0, 1, 1]
    got = random_same_class_pairs(names, classes, 37, seed=3)
    want = _bar_transcription(names, classes, 37, 3)
    assert [(names[j], classes[j]) for j in got] == want
    with pytest.raises(DataError, match="class 3 has no image other than 'x'"):
        random_same_class_pairs(["x", "y"], [3, 4], 2, 0)
    root = tmp_path / "p8"
    ensure_synthetic({"kind": "pascal5i", "n_train": 8, "n_val": 8, "side": 32, "seed": 0}, root)
    dm = Pascal5iDataModule(str(root), fold=0, pair="random_same_class", episodes=20, seed=0)
    dm.cell = 15
    dm.prepare_pairs()
    dm.build()
    ds = dm.datasets["test"]
    assert ds.per_episode and ds.pool is dm._items["test"] and len(ds) == 20
    for e in range(20):
        q, s = dm._items["test"][e % 8], ds.pool[ds.pairs[e]]
        assert s["class"] == q["class"] and s["id"] != q["id"]


def test_timm_token_retriever_is_cosine_over_flattened_forward_features(pascal_root, tmp_path):
    torch.manual_seed(0)
    r = TimmTokenRetriever("test_vit", "random")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    x = r.transform(img)
    assert x.shape == (3, r.size, r.size)
    # Resize(size, BICUBIC) on the shorter side (long side truncated), CenterCrop, Normalize
    s = r.size
    ref = img.resize((int(s * 40 / 30), s), Image.BICUBIC)
    left = int(round((ref.width - s) / 2.0))
    ref = torch.from_numpy(np.asarray(ref.crop((left, 0, left + s, s)), dtype=np.float32).copy()).permute(2, 0, 1) / 255
    assert torch.allclose(x, (ref - 0.5) / 0.5, atol=1e-6)
    paths = [str(p) for p in sorted((pascal_root / "VOC2012/JPEGImages").glob("*.jpg"))[:5]]
    sims = similarity(r, "timm:test_vit:random", paths[:2], paths)
    from prompttune.data.base import read_image

    with torch.no_grad():
        f = torch.stack([r.model.forward_features(r.transform(read_image(p))[None])[0].flatten() for p in paths])
    f = f / f.norm(dim=1, keepdim=True)
    assert sims.shape == (2, 5) and torch.allclose(sims, f[:2] @ f.T, atol=1e-5)
    assert float(sims[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(similarity(r, "timm:test_vit:random", paths[:2], paths), sims)  # cached
    with pytest.raises(FileNotFoundError, match="retriever weights not found"):
        TimmTokenRetriever("test_vit", str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="timm has no such model"):
        TimmTokenRetriever("no_such_vit_xyz", "random")
    dm = Pascal5iDataModule(str(pascal_root), fold=0, pair="retrieved", retriever="timm:test_vit",
                            retriever_weights="random", seed=0)
    dm.cell = 15
    dm.prepare_pairs()
    assert len(dm._pairs["test"]) == 4 and len(dm._pairs["train"]) == 8


def test_voc_detection_resizes_bilinearly(tmp_path):
    from prompttune.data.voc_detection import VOCDetectionDataModule

    root = tmp_path / "voc"
    ensure_synthetic({"kind": "voc_detection", "n_train": 20, "n_val": 30, "side": 32, "seed": 0}, root)
    dm = VOCDetectionDataModule(str(root), pair="random", seed=0)
    assert dm.interpolation == "bilinear" and dm.info()["kind"] == "detection"
    dm.cell = 15
    dm.prepare_pairs()
    dm.build()
    it = dm.datasets["test"][0]
    q = dm._items["test"][0]
    ref = Image.open(q["path"]).convert("RGB").resize((15, 15), Image.BILINEAR)
    assert torch.allclose(it["query_image"], torch.from_numpy(np.asarray(ref, dtype=np.float32).copy()).permute(2, 0, 1) / 255)
    assert Pascal5iDataModule(str(root)).interpolation == "bicubic"


def test_val_fraction_holds_out_whole_images(pascal_root):
    dm = Pascal5iDataModule(str(pascal_root), fold=0, pair="random", val_fraction=0.25, seed=0)
    dm.cell = 15
    dm.prepare_pairs()
    val_ids = {it["id"] for it in dm._items["val"]}
    assert len(val_ids) == 2
    assert not val_ids & {it["id"] for it in dm._items["train"]} and not val_ids & {it["id"] for it in dm._items["pool"]}
    batch = next(iter(dm.val_dataloader()))
    assert batch["query_image"].shape[1:] == (3, 15, 15)
    no_val = Pascal5iDataModule(str(pascal_root), fold=0, pair="random", seed=0)
    no_val.cell = 15
    no_val.prepare_pairs()
    with pytest.raises(Exception, match="no validation split: set data.val_fraction"):
        no_val.val_dataloader()
