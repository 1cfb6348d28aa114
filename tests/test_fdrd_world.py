"""The synthetic FDRD world's look-alike gallery (issue 16): each test anchor comes with images that
differ from it in exactly one caption word (sub-category, colour or size) and in nothing else."""

import json

import numpy as np
import pytest
from PIL import Image

from prompttune.data.fdrd import LOOKALIKE_KINDS, class_from_key, nearest_color, write_fdrd
from prompttune.data.world import COLORS, fine_classes

KINDS = ["subcategory", "color", "size"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("fdrd_world")
    write_fdrd(r, n_train=1, n_val=1, n_test=2, side=32, seed=3, lookalikes=KINDS)
    return r


def groups(root, split="test"):
    recs = json.loads((root / f"FDRD/{split}/synth_{split}.json").read_text())
    out: dict[str, dict[str, tuple[str, dict]]] = {}
    for key, rec in recs.items():
        stem, _, kind = rec["file_name"].rpartition("_")
        if kind not in LOOKALIKE_KINDS:
            stem, kind = rec["file_name"], "anchor"
        out.setdefault(stem, {})[kind] = (key, rec)
    return out


def test_each_anchor_has_one_lookalike_per_kind(root):
    g = groups(root)
    assert len(g) == 16 * 2 and all(set(v) == {"anchor", *KINDS} for v in g.values())
    val = groups(root, "val")
    assert len(val) == 16 and all(set(v) == {"anchor", *KINDS} for v in val.values())
    train = json.loads((root / "FDRD/train/synth_train.json").read_text())
    assert len(train) == 16  # training pairs come without look-alikes


def test_lookalike_caption_differs_in_exactly_its_word(root):
    slot = {"size": 1, "color": 2, "subcategory": 3}  # "a <size> <colour> <pattern> <shape>"
    for members in groups(root).values():
        anchor = members["anchor"][1]["positive"].split(" ")
        for kind in KINDS:
            key, rec = members[kind]
            words = rec["positive"].split(" ")
            changed = [i for i, (a, b) in enumerate(zip(anchor, words)) if a != b]
            assert len(words) == len(anchor) and changed == [slot[kind]], (anchor, words)
            if kind == "color":
                assert words[2] == nearest_color(anchor[2])
            # the key names the item's own class (a sub-category look-alike is another fine class)
            assert class_from_key(key) == " ".join(words[3:]) and class_from_key(key) in fine_classes()
            assert len(rec["negative"]) == 4 and rec["positive"] not in rec["negative"]


def test_lookalike_image_differs_only_where_the_object_changed(root):
    members = next(iter(groups(root).values()))
    img = {k: np.asarray(Image.open(root / "images" / f"{r['file_name']}.png")).astype(int)
           for k, (_, r) in members.items()}
    for kind in KINDS:
        diff = np.abs(img[kind] - img["anchor"]).sum(-1) > 0
        # same background, noise and pattern phase: only part of the image changes, but some of it does
        assert 0 < diff.mean() < 0.9, (kind, diff.mean())
    # a colour or pattern change keeps the silhouette: the background around the object is identical
    assert (np.abs(img["color"] - img["anchor"]).sum(-1) > 0).mean() < 0.6


def test_nearest_color_is_another_world_colour():
    for c in COLORS:
        n = nearest_color(c)
        assert n in COLORS and n != c
    assert nearest_color("red") == "orange" and nearest_color("blue") == "purple"


def test_bad_lookalike_kind_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"lookalikes=\['shape'\].*subcategory, color, size"):
        write_fdrd(tmp_path / "x", lookalikes=["shape"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="distinct"):
        write_fdrd(tmp_path / "y", lookalikes=["color", "color"])


def test_default_writes_no_lookalikes(tmp_path):
    write_fdrd(tmp_path, n_train=1, n_val=1, n_test=1, side=16)
    test = json.loads((tmp_path / "FDRD/test/synth_test.json").read_text())
    assert len(test) == 16 and not any(r["file_name"].endswith(tuple(LOOKALIKE_KINDS)) for r in test.values())
