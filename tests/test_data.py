import json
import re

import numpy as np
import pytest
import torch

from prompttune.data.base import CorruptImageError, DataError, ListDataset, ImageTransform
from prompttune.data.image_folder import ImageFolderDataModule, ensure_synthetic
from prompttune.data.world import CATEGORIES, SUBCATEGORIES, fine_classes, render, sample_object, sample_scene


def _world(tmp_path, **kw):
    root = tmp_path / "world"
    ensure_synthetic({"kind": "classification", "n_train": 3, "n_val": 1, "n_test": 2, "side": 16, "seed": 0, **kw}, root)
    return root


def test_world_objects_have_masks_boxes_captions():
    rng = np.random.default_rng(0)
    obj = sample_object(rng, category="disc", subcategory="striped", color="red", size="large")
    img, masks = render([obj], 32, rng)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and masks.shape == (1, 32, 32)
    ys, xs = np.nonzero(masks[0])
    assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert obj.caption() == "a large red striped disc" and obj.fine_class == "striped disc"
    assert len(fine_classes()) == len(CATEGORIES) * len(SUBCATEGORIES)
    scene = sample_scene(rng, n_objects=3)
    assert len({o.fine_class for o in scene}) == 1


def test_world_is_seeded():
    a = render([sample_object(np.random.default_rng(5))], 16, np.random.default_rng(1))[0]
    b = render([sample_object(np.random.default_rng(5))], 16, np.random.default_rng(1))[0]
    assert np.array_equal(a, b)


def test_synthetic_world_is_written_in_coop_layout(tmp_path):
    root = _world(tmp_path)
    split = json.loads((root / "split_prompttune_world.json").read_text())
    assert set(split) == {"train", "val", "test"} and len(split["train"]) == 16 * 3
    path, label, name = split["train"][0]
    assert (root / "images" / path).is_file() and name == fine_classes()[label]


def test_fewshot_split_is_saved_and_reused(tmp_path):
    root = _world(tmp_path)
    dm = ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json", shots=2, seed=1)
    dm.check()
    dm.build()
    f = root / "split_fewshot" / "shot_2-seed_1.json"
    assert f.is_file() and len(dm.datasets["train"]) == 32
    first = json.loads(f.read_text())["train"]
    dm2 = ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json", shots=2, seed=1)
    dm2.build()
    assert [i["path"] for i in dm2.datasets["train"].items] == [i["path"] for i in dm.datasets["train"].items]
    assert first == json.loads(f.read_text())["train"]
    dm3 = ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json", shots=2, seed=2)
    dm3.build()
    assert [i["path"] for i in dm3.datasets["train"].items] != [i["path"] for i in dm.datasets["train"].items]


def test_missing_and_empty_folders(tmp_path):
    dm = ImageFolderDataModule(root=str(tmp_path / "nope"), split_file="s.json")
    with pytest.raises(DataError, match=r"dataset folder not found: .*nope \(expected images/ and s.json\)"):
        dm.check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="dataset folder is empty"):
        ImageFolderDataModule(root=str(tmp_path / "empty"), split_file="s.json").check()


def test_split_naming_missing_images(tmp_path):
    root = _world(tmp_path)
    split = json.loads((root / "split_prompttune_world.json").read_text())
    split["test"].append(["ghost/img.png", 0, split["train"][0][2]])
    (root / "split_prompttune_world.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"names 1 missing images .*ghost/img.png"):
        ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json").check()


def test_class_lists_that_disagree_between_splits(tmp_path):
    root = _world(tmp_path)
    split = json.loads((root / "split_prompttune_world.json").read_text())
    split["test"][0][2] = "renamed class"
    (root / "split_prompttune_world.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"label 0 is 'plain disc' in one split and 'renamed class' in 'test'"):
        ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json").check()


def test_split_file_in_the_wrong_format(tmp_path):
    root = _world(tmp_path)
    (root / "split_prompttune_world.json").write_text('{"train": [["a.png", "zero"]], "test": []}')
    with pytest.raises(DataError, match=r"rows must be \[path, label, classname\]"):
        ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json").check()
    (root / "split_prompttune_world.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json").check()


def test_corrupt_image_fails_or_skips_with_a_warning(tmp_path):
    root = _world(tmp_path)
    split = json.loads((root / "split_prompttune_world.json").read_text())
    bad = root / "images" / split["train"][0][0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    items = [{"path": str(root / "images" / p), "label": lab} for p, lab, _ in split["train"][:3]]
    tf = ImageTransform(16, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(CorruptImageError, match=r"corrupt or truncated image .*\.png"):
        ListDataset(items, tf)[0]
    ds = ListDataset(items, tf, on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping corrupt or truncated image"):
        out = ds[0]
    assert out["index"].item() == 1 and out["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="on_corrupt must be 'error' or 'skip'"):
        ListDataset(items, tf, on_corrupt="ignore")


def test_synthetic_generation_never_overwrites_foreign_data(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty and holds no synthetic-world marker"):
        ensure_synthetic({"kind": "classification", "n_train": 1, "n_val": 0, "n_test": 1, "side": 8}, root)
    assert (root / "precious.txt").read_text() == "keep"


def test_transform_normalises_and_crops():
    from PIL import Image

    img = Image.fromarray(np.full((20, 40, 3), 255, dtype=np.uint8))
    x = ImageTransform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(img)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.full_like(x, 2.0))


def test_stale_synthetic_data_is_regenerated_even_with_its_split_file_present(tmp_path):
    """Data generated by an older world version (or another spec) must not be reused silently."""
    root = _world(tmp_path)
    marker = root / "prompttune_world.json"
    old = json.loads(marker.read_text())
    old.pop("world_version")  # as written before the world was versioned
    marker.write_text(json.dumps(old))
    (root / "images" / "stale.txt").write_text("from the old world")
    dm = ImageFolderDataModule(root=str(root), split_file="split_prompttune_world.json",
                               synthetic={"kind": "classification", "n_train": 3, "n_val": 1, "n_test": 2, "side": 16,
                                          "seed": 0})
    dm.check()
    assert not (root / "images" / "stale.txt").exists()
    assert "world_version" in json.loads(marker.read_text())


def test_transform_resize_ratio_applies_to_images_already_at_size():
    """Resize 256 / CenterCrop 224 zooms in even when the image is already 224 (FGVC protocol)."""
    from PIL import Image

    img = Image.fromarray((np.arange(8 * 8 * 3) % 251).astype(np.uint8).reshape(8, 8, 3))
    out = ImageTransform(8, (0, 0, 0), (1, 1, 1), resize_ratio=2.0)(img)
    want = np.asarray(img.resize((16, 16), Image.BICUBIC).crop((4, 4, 12, 12)), dtype=np.float32) / 255
    torch.testing.assert_close(out, torch.from_numpy(want).permute(2, 0, 1))
    same = ImageTransform(8, (0, 0, 0), (1, 1, 1))(img)  # ratio 1: untouched
    torch.testing.assert_close(same, torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))


def test_read_json_names_the_file_when_missing_unparsable_or_not_utf8(tmp_path):
    from prompttune.data.base import DataError, read_json

    f = tmp_path / "a.json"
    with pytest.raises(DataError, match="^no split file here$"):
        read_json(f, "no split file here")
    f.write_text('{"train": [')
    with pytest.raises(DataError, match=rf"^split file {re.escape(str(f))} is not valid JSON: "):
        read_json(f, "missing", "split file ")
    f.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(DataError, match="is not valid JSON"):
        read_json(f, "missing")
    f.write_text('{"train": [1]}')
    assert read_json(f, "missing") == {"train": [1]}


def test_random_crop_box_stays_inside_and_follows_its_scale_and_seed():
    from prompttune.data.base import random_crop_box

    boxes = [random_crop_box(64, 48, np.random.default_rng(s), (0.5, 1.0)) for s in range(200)]
    assert all(b is not None for b in boxes)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
        assert 0.5 * 64 * 48 * 0.9 <= (x1 - x0) * (y1 - y0) <= 64 * 48  # area fraction in scale (rounding aside)
    assert len(set(boxes)) > 100  # the draw varies with the generator ...
    assert random_crop_box(64, 48, np.random.default_rng(7), (0.5, 1.0)) == boxes[7]  # ... and only with it
    assert random_crop_box(1, 400, np.random.default_rng(0), (0.9, 1.0)) is None  # no try fits: caller's fallback
