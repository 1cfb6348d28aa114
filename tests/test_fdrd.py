"""FDRD format: the synthetic writer, the loader on released-style files, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompttune.data.base import DataError
from prompttune.data.fdrd import (FDRDDataModule, ImageLocator, class_from_key, read_fdrd_json, swap_class,
                                  swapped_class, write_fdrd)
from prompttune.data.world import SUBCATEGORIES, fine_classes

SPEC = dict(kind="fdrd", n_train=2, n_val=1, n_test=2, side=16, seed=0, background="noise", n_negatives=4)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fdrd")
    spec = dict(SPEC)
    spec.pop("kind")
    write_fdrd(root, **spec)
    return root


def make_dm(root, **kw):
    args = dict(root=str(root), train_file="FDRD/train/synth_train.json", test_file="FDRD/test/synth_test.json",
                image_dir="images", eval_batch_size=64)
    args.update(kw)
    dm = FDRDDataModule(**args)
    dm.configure_for(type("B", (), {"image_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3})())
    return dm


def test_writer_matches_released_format(synth_root):
    test = json.loads((synth_root / "FDRD/test/synth_test.json").read_text())
    train = json.loads((synth_root / "FDRD/train/synth_train.json").read_text())
    assert len(test) == 16 * 2 and len(train) == 16 * 2
    key, rec = next(iter(test.items()))
    assert set(rec) == {"file_name", "file_path", "positive", "negative"}
    assert rec["file_path"].startswith("/root/") and not Path(rec["file_path"]).exists()  # foreign, like the release
    assert len(rec["negative"]) == 4
    cls = class_from_key(key)
    assert cls in fine_classes() and cls in rec["positive"]
    sub, shape = cls.split(" ")
    # the first three negatives swap the sub-category (pattern) within the same shape; the rest another class
    for neg in rec["negative"][:3]:
        swapped = neg.replace(rec["positive"].split(cls)[0], "", 1).split(" ")
        assert neg != rec["positive"] and neg.endswith(shape) and sub not in neg.split(" ")
        assert any(s in swapped for s in SUBCATEGORIES)
    assert not rec["negative"][3].endswith(shape)
    tr = next(iter(train.values()))
    assert tr["negative"] == [] and tr["file_path"] == "YOUR_IMAGE_PATH" and tr["class_name"] in fine_classes()


def test_loader_reads_synthetic(synth_root):
    dm = make_dm(synth_root)
    dm.check()
    dm.build()
    assert dm.classnames == sorted(fine_classes(), key=str.lower)
    test = dm.datasets["test"]
    assert len(test) == 32 and len(dm.datasets["train"]) == 32
    item = test[0]
    assert item["image"].shape == (3, 16, 16)
    # the loader resolves which class each negative swapped in: the three siblings first
    rec = test.items[0]
    for neg, lab in zip(rec["negative"], rec["neg_labels"]):
        assert lab >= 0 and dm.classnames[lab] in neg and lab != rec["label"]
    batch = test.collate([test[i] for i in range(5)])
    assert batch["image"].shape == (5, 3, 16, 16) and batch["neg_labels"].shape == (5, 4)
    assert len(batch["caption"]) == 5 and len(batch["negatives"][0]) == 4
    info = dm.info()
    assert info["num_classes"] == 16 and info["n_negatives"] == 4 and len(info["train_captions"]) == 32


def test_identical_captions_share_an_id(synth_root):
    dm = make_dm(synth_root)
    dm.build()
    items = dm.datasets["test"].items
    by_caption = {}
    for it in items:
        by_caption.setdefault(it["positive"], set()).add(it["caption_id"])
    assert all(len(ids) == 1 for ids in by_caption.values())
    assert len({it["caption_id"] for it in items}) == len(by_caption)


def test_fewshot_draw(synth_root):
    dm = make_dm(synth_root, shots=1, seed=3)
    dm.build()
    labels = [it["label"] for it in dm.datasets["train"].items]
    assert sorted(labels) == list(range(16))


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8)).save(path)


def test_released_layouts(tmp_path):
    """Pets-style keys and foreign paths, and the flowers file's class_name + number."""
    root = tmp_path / "oxford_pets"
    _img(root / "images" / "Sphynx_43.jpg")
    _img(root / "images" / "german_shorthaired_12.jpg")
    test = {
        "Sphynx_43": {"file_name": "Sphynx_43", "file_path": "/root/x/DATA/oxford_pets/images/Sphynx_43.jpg",
                      "positive": "A Sphynx with green eyes.",
                      "negative": ["A german shorthaired with green eyes.", "A Bengal with green eyes."]},
        "german_shorthaired_12": {"file_name": "german_shorthaired_12",
                                  "file_path": "/root/x/DATA/oxford_pets/images/german_shorthaired_12.jpg",
                                  "positive": "A german shorthaired runs.",
                                  "negative": ["A Sphynx runs.", "A pug runs."]},
    }
    (root / "test.json").write_text(json.dumps(test))
    dm = make_dm(root, train_file=None, test_file="test.json")
    dm.check()
    assert dm.classnames == ["german shorthaired", "Sphynx"]
    recs = dm._records["test"]
    assert recs[0]["path"] == root / "images" / "Sphynx_43.jpg"
    assert recs[0]["neg_labels"] == [0, -1]  # "Bengal" is no known class
    assert recs[1]["neg_labels"] == [1, -1]

    flowers = tmp_path / "oxford_flowers"
    _img(flowers / "jpg" / "image_06422.jpg")
    rec = {"file_name": "monkshood_image_06422", "class_name": "monkshood", "number": "06422",
           "file_path": "/root/x/flower/test/monkshood_image_06422.jpg", "positive": "This is a monkshood.",
           "negative": ["This is a sword lily."]}
    (flowers / "t.json").write_text(json.dumps({"monkshood_image_06422": rec}))
    r = read_fdrd_json(flowers / "t.json", need_negatives=True)[0]
    assert r["class_name"] == "monkshood"
    assert ImageLocator(flowers, "jpg").find(r) == flowers / "jpg" / "image_06422.jpg"


def test_helpers():
    assert class_from_key("Sphynx_43") == "Sphynx"
    assert class_from_key("707-320_1514522") == "707-320"
    assert class_from_key("german_shorthaired_12.jpg") == "german shorthaired"
    names = ["disc", "striped disc", "dotted disc"]
    assert swapped_class("a red dotted disc", "a red striped disc", names) == 2
    assert swapped_class("a red striped disc", "a red striped disc", names) == -1


@pytest.mark.parametrize("record,needle", [
    ({"file_path": "a.jpg", "negative": ["x"]}, "missing key 'positive'"),
    ({"file_path": "a.jpg", "positive": "p", "negative": "x"}, "must be a list"),
    ({"file_path": "a.jpg", "positive": "", "negative": ["x"]}, "non-empty caption"),
])
def test_bad_records_named(tmp_path, record, needle):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"item_1": record}))
    with pytest.raises(DataError, match=needle) as err:
        read_fdrd_json(p, need_negatives=True)
    assert "item_1" in str(err.value) and "bad.json" in str(err.value)


def test_bad_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_fdrd_json(p, need_negatives=True)
    with pytest.raises(DataError, match="not found"):
        read_fdrd_json(tmp_path / "missing.json", need_negatives=True)
    p.write_text(json.dumps({"a_1": {"file_path": "a", "positive": "p", "negative": ["x", "y"]},
                             "b_1": {"file_path": "b", "positive": "q", "negative": ["x"]}}))
    with pytest.raises(DataError, match="same number"):
        read_fdrd_json(p, need_negatives=True)


def test_missing_images_fail_before_compute(tmp_path):
    root = tmp_path / "ds"
    _img(root / "images" / "other.jpg")
    (root / "t.json").write_text(json.dumps({"cat_1": {"file_name": "cat_1", "file_path": "/root/ds/images/cat_1.jpg",
                                                       "positive": "a cat", "negative": ["a dog"]}}))
    dm = make_dm(root, train_file=None, test_file="t.json")
    with pytest.raises(DataError, match=r"no image found for 1 of 1 items.*cat_1"):
        dm.check()
    with pytest.raises(DataError, match="test_file is required"):
        make_dm(root, test_file=None).check()


def test_corrupt_image_named(synth_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    dm = make_dm(root)
    dm.build()
    bad = Path(dm.datasets["test"].items[0]["path"])
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=bad.name):
        dm.datasets["test"][0]
    assert isinstance(torch.tensor(0), torch.Tensor)


# ------------------------------------------------------------------ released-format records (written here)
PETS_TEST = {  # pets_test.json layout: key "<Class>_<n>", foreign file_path, 4 negatives swapping every occurrence
    "Sphynx_43": {"file_name": "Sphynx_43", "file_path": "/root/autodl-tmp/x/DATA/oxford_pets/images/Sphynx_43.jpg",
                  "positive": "A Sphynx with green eyes sits on a bed. The sphynx looks at the camera.",
                  "negative": ["A Bombay with green eyes sits on a bed. The Bombay looks at the camera.",
                               "A British Shorthair with green eyes sits on a bed. The British Shorthair looks at the camera.",
                               "A F-16A/B with green eyes sits on a bed. The F-16A/B looks at the camera.",
                               "A F/A-18 with green eyes sits on a bed. The F/A-18 looks at the camera."]},
    "British_Shorthair_7": {"file_name": "British_Shorthair_7",
                            "file_path": "/root/autodl-tmp/x/DATA/oxford_pets/images/British_Shorthair_7.jpg",
                            "positive": "A grey British Shorthair on a sofa; the british shorthair is asleep.",
                            "negative": ["A grey Sphynx on a sofa; the Sphynx is asleep.",
                                         "A grey Bombay on a sofa; the Bombay is asleep.",
                                         "A grey F-16A/B on a sofa; the F-16A/B is asleep.",
                                         "A grey F/A-18 on a sofa; the F/A-18 is asleep."]},
}
PLANES_TEST = {  # plane_test.json layout: '/' in the class name written as '_' in the key
    "F-16A_B_1614884": {"file_name": "1614884", "file_path": "/root/autodl-tmp/x/DATA/fgvc_aircraft/images/1614884.jpg",
                        "positive": "A grey F-16A/B fighter on the apron. The F-16A/B carries two tanks.",
                        "negative": ["A grey F/A-18 fighter on the apron. The F/A-18 carries two tanks."]},
    "F_A-18_0123456": {"file_name": "0123456", "file_path": "/root/autodl-tmp/x/DATA/fgvc_aircraft/images/0123456.jpg",
                       "positive": "An F/A-18 lands on a carrier; the f/a-18 has its hook down.",
                       "negative": ["An F-16A/B lands on a carrier; the F-16A/B has its hook down."]},
    "BAE 146-200_0222222": {"file_name": "0222222",
                            "file_path": "/root/autodl-tmp/x/DATA/fgvc_aircraft/images/0222222.jpg",
                            "positive": "A BAE 146-200 in white livery, a BAE 146-200 of a regional airline.",
                            "negative": ["A F-16A/B in white livery, a F-16A/B of a regional airline."]},
}


def _write_released(root, name, records, image_dir="images"):
    for rec in records.values():
        _img(root / image_dir / Path(rec["file_path"]).name)
    (root / "FDRD" / "test").mkdir(parents=True, exist_ok=True)
    (root / "FDRD" / "test" / name).write_text(json.dumps(records))


def test_swap_class_replaces_every_occurrence_as_released():
    for rec in PETS_TEST.values():
        cls = class_from_key(next(k for k, v in PETS_TEST.items() if v is rec), [rec["positive"]])
        for neg in rec["negative"]:
            new = next(c for c in ("Bombay", "British Shorthair", "F-16A/B", "F/A-18", "Sphynx") if c in neg)
            assert swap_class(rec["positive"], cls, new) == neg  # both occurrences, any case
    assert swap_class("a Sphynx; the SPHYNX.", "sphynx", "Bombay") == "a Bombay; the Bombay."
    assert swap_class("An A330-200 jet", "A330", "X") is None  # not inside a longer name
    assert swap_class("a german  shorthaired pointer", "german shorthaired", "pug") == "a pug pointer"
    assert swap_class("a cat", "dog", "pug") is None


def test_slash_class_keys_resolved_from_captions(tmp_path):
    assert class_from_key("F-16A_B_1614884", ["an F-16A/B jet"]) == "F-16A/B"
    assert class_from_key("F_A-18_12", ["two f/a-18 jets"]) == "F/A-18"
    assert class_from_key("British_Shorthair_7", ["a british shorthair"]) == "British Shorthair"
    assert class_from_key("F-16A_B_1614884") == "F-16A B"  # no caption names it: spaces
    root = tmp_path / "fgvc_aircraft"
    _write_released(root, "plane_test.json", PLANES_TEST)
    dm = FDRDDataModule(root=str(root), test_file="FDRD/test/plane_test.json", eval_batch_size=8)
    dm.configure_for(type("B", (), {"image_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3})())
    dm.check()
    assert dm.classnames == ["BAE 146-200", "F-16A/B", "F/A-18"]
    recs = {r["key"]: r for r in dm._records["test"]}
    f16, fa18 = dm.classnames.index("F-16A/B"), dm.classnames.index("F/A-18")
    assert recs["F-16A_B_1614884"]["label"] == f16 and recs["F-16A_B_1614884"]["neg_labels"] == [fa18]
    assert recs["F_A-18_0123456"]["neg_labels"] == [f16] and recs["BAE 146-200_0222222"]["neg_labels"] == [f16]


def test_pets_records_with_classes_named_twice(tmp_path):
    root = tmp_path / "oxford_pets"
    _write_released(root, "pets_test.json", PETS_TEST)
    dm = FDRDDataModule(root=str(root), test_file="FDRD/test/pets_test.json", eval_batch_size=8)
    dm.configure_for(type("B", (), {"image_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3})())
    dm.check()
    dm.build()
    assert dm.classnames == ["British Shorthair", "Sphynx"]
    sph = next(r for r in dm._records["test"] if r["key"] == "Sphynx_43")
    # Bombay, F-16A/B, F/A-18 are not classes of this file: -1; British Shorthair is
    assert sph["neg_labels"] == [-1, 0, -1, -1]


def test_evaluation_files_without_negatives_accepted(tmp_path):
    """DTD/Caltech/UCF test files in the DCAR history have "negative": []: whole-gallery R@K needs none."""
    root = tmp_path / "dtd"
    recs = {f"{c}_{i}": {"file_name": f"{c}_{i}", "file_path": f"/root/x/dtd/images/{c}_{i}.jpg",
                         "positive": f"a {c} texture, {c} all over, number {i}", "negative": []}
            for c in ("banded", "dotted") for i in range(3)}
    _write_released(root, "dtd_test.json", recs)
    dm = FDRDDataModule(root=str(root), test_file="FDRD/test/dtd_test.json", eval_batch_size=8)
    dm.configure_for(type("B", (), {"image_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3})())
    dm.check()
    dm.build()
    assert dm.info()["n_negatives"] == 0
    ds = dm.datasets["test"]
    batch = ds.collate([ds[i] for i in range(len(ds))])
    assert batch["neg_labels"].shape == (6, 0) and batch["negatives"] == [[]] * 6
    from prompttune.tasks.retrieval import retrieval_metrics

    x = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    m = retrieval_metrics(x, x, x.new_zeros(6, 0, 4), batch["label"], batch["neg_labels"], batch["caption_id"])
    assert m["i2t/R@1"] == 1.0 and not any(k.startswith("1pos") for k in m)
