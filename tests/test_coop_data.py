"""CoOp's datasets: the official few-shot draw (a transcription of Dassl's), official
split_fewshot/*.pkl files read without unpickling code, the FGVCAircraft and ImageNet layouts,
one data config per CoOp dataset, and zero-shot's templates and class names."""

import pickle
import random
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from prompttune.data.base import DataError
from prompttune.data.image_folder import (ImageFolderDataModule, ensure_synthetic, official_fewshot_draw,
                                          read_fewshot_pickle)

REPO = Path(__file__).resolve().parents[1]
SPLIT = "split_prompttune_world.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("coopdata") / "world"
    ensure_synthetic({"kind": "classification", "n_train": 6, "n_val": 5, "n_test": 2, "side": 8, "seed": 0}, root)
    return root


# ---------------------------------------------------------------------------- the official draw
def dassl_draw(train, val, shots, seed):
    """Transcription of CoOp's few-shot step: set_random_seed(seed) (global random.seed), then
    DatasetBase.generate_fewshot_dataset on train (K) and val (min(K, 4)): a defaultdict tracker
    by label in order of appearance and random.sample(items, K) per class."""
    random.seed(seed)

    def generate(data, k):
        tracker = defaultdict(list)
        for item in data:
            tracker[item[1]].append(item)
        out = []
        for _, items in tracker.items():
            out.extend(random.sample(items, k) if len(items) >= k else items)
        return out

    return generate(train, shots), generate(val, min(shots, 4))


def test_draw_is_the_official_one_image_for_image():
    # labels in a non-sorted order of first appearance (as in a real split file), uneven class sizes
    train = [[f"c{lab}/{i}.jpg", lab, f"c{lab}"] for lab in (3, 0, 2, 1) for i in range(7 + lab)]
    random.Random(5).shuffle(train)
    val = [[f"v{lab}/{i}.jpg", lab, f"c{lab}"] for lab in range(4) for i in range(5)]
    for shots, seed in ((1, 1), (2, 2), (4, 3), (16, 1)):
        want_train, want_val = dassl_draw(train, val, shots, seed)
        got = official_fewshot_draw({"train": train, "val": val}, shots, seed)
        assert got["train"] == want_train and got["val"] == want_val  # same images, same order


def test_datamodule_uses_the_official_draw_and_caches_it(world):
    import json

    dm = ImageFolderDataModule(root=str(world), split_file=SPLIT, shots=2, seed=3)
    dm.setup()
    data = json.loads((world / SPLIT).read_text())
    want_train, want_val = dassl_draw(data["train"], data["val"], 2, 3)
    assert [it["path"] for it in dm.datasets["train"].items] == [str(world / "images" / r[0]) for r in want_train]
    assert [it["path"] for it in dm.datasets["val"].items] == [str(world / "images" / r[0]) for r in want_val]
    cache = json.loads((world / "split_fewshot" / "shot_2-seed_3.json").read_text())
    assert cache["sampler"] == "dassl-random" and cache["train"] == want_train


def test_an_older_numpy_cache_is_redrawn(world):
    import json

    path = world / "split_fewshot" / "shot_1-seed_4.json"
    path.parent.mkdir(exist_ok=True)
    data = json.loads((world / SPLIT).read_text())
    path.write_text(json.dumps({"train": data["train"][:16], "val": []}))  # no sampler marker
    dm = ImageFolderDataModule(root=str(world), split_file=SPLIT, shots=1, seed=4)
    dm.setup()
    want, _ = dassl_draw(data["train"], data["val"], 1, 4)
    assert [it["path"] for it in dm.datasets["train"].items] == [str(world / "images" / r[0]) for r in want]


# ---------------------------------------------------------------------------- official .pkl files
class _FakeDassl:
    """Installs a stand-in ``dassl.data.datasets.base_dataset.Datum`` (the official class, minus
    its file-exists assert) so the fixture is pickled exactly as CoOp writes it."""

    def __enter__(self):
        mod = types.ModuleType("dassl.data.datasets.base_dataset")

        class Datum:
            def __init__(self, impath="", label=0, domain=0, classname=""):
                self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

        Datum.__module__ = mod.__name__
        Datum.__qualname__ = "Datum"
        mod.Datum = Datum
        self.names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
        for n in self.names[:-1]:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[self.names[-1]] = mod
        return Datum

    def __exit__(self, *exc):
        for n in self.names:
            sys.modules.pop(n, None)


@pytest.mark.parametrize("protocol", [pickle.HIGHEST_PROTOCOL, 0])
def test_official_fewshot_pickle_is_read_without_unpickling_code(world, tmp_path, protocol):
    import json

    root = tmp_path / "pets"
    root.mkdir()
    (root / SPLIT).write_text((world / SPLIT).read_text())
    (root / "images").symlink_to(world / "images")
    data = json.loads((world / SPLIT).read_text())
    # a subset the official draw would not give: the LAST image of each class, absolute paths of another machine
    pick_train = [r for r in data["train"] if r[0].endswith("_0005.png")]
    pick_val = [r for r in data["val"] if r[0].endswith("_0000.png")]
    other = "/home/someone/data/oxford_pets/images"
    with _FakeDassl() as Datum:
        blob = {"train": [Datum(f"{other}/{p}", lab, 0, c) for p, lab, c in pick_train],
                "val": [Datum(f"{other}/{p}", lab, 0, c) for p, lab, c in pick_val]}
        (root / "split_fewshot").mkdir()
        (root / "split_fewshot" / "shot_16-seed_1.pkl").write_bytes(pickle.dumps(blob, protocol=protocol))
    assert "dassl.data.datasets.base_dataset" not in sys.modules  # read with no dassl installed
    dm = ImageFolderDataModule(root=str(root), split_file=SPLIT, shots=16, seed=1)
    dm.setup()
    assert [it["path"] for it in dm.datasets["train"].items] == [str(root / "images" / r[0]) for r in pick_train]
    assert [it["path"] for it in dm.datasets["val"].items] == [str(root / "images" / r[0]) for r in pick_val]
    assert dm.fewshot_source.endswith("shot_16-seed_1.pkl")
    assert not (root / "split_fewshot" / "shot_16-seed_1.json").exists()  # nothing drawn


def test_a_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "shot_1-seed_1.pkl"
    path.write_bytes(pickle.dumps({"train": [Evil()]}))
    with pytest.raises(DataError, match="refusing to load global builtins.print"):
        read_fewshot_pickle(path)


def test_a_pickle_naming_unknown_images_is_a_clear_error(world, tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / SPLIT).write_text((world / SPLIT).read_text())
    (root / "images").symlink_to(world / "images")
    with _FakeDassl() as Datum:
        blob = {"train": [Datum("/x/images/nope/missing.jpg", 0, 0, "c")], "val": []}
        (root / "split_fewshot").mkdir()
        (root / "split_fewshot" / "shot_1-seed_1.pkl").write_bytes(pickle.dumps(blob))
    dm = ImageFolderDataModule(root=str(root), split_file=SPLIT, shots=1, seed=1)
    with pytest.raises(DataError, match="matches no image of this dataset's split"):
        dm.setup()


# ---------------------------------------------------------------------------- FGVCAircraft and ImageNet layouts
def _jpg(path, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, format="JPEG")


def test_fgvc_aircraft_layout(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F/A-18"]
    (root).mkdir()
    (root / "variants.txt").write_text("\n".join(variants) + "\n")
    ids = {"train": ["0001", "0002", "0003", "0004"], "val": ["0005", "0006", "0007"], "test": ["0008", "0009", "0010"]}
    for split, names in ids.items():
        lines = [f"{n} {variants[i % 3]}" for i, n in enumerate(names)]
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for n in names:
            _jpg(root / "images" / f"{n}.jpg", (10 * int(n), 0, 0))
    dm = ImageFolderDataModule(root=str(root), layout="fgvc_aircraft", shots=0)
    dm.setup()
    assert dm.info()["classnames"] == variants  # label order = variants.txt order, spaces/slashes kept
    assert [(Path(it["path"]).name, it["label"]) for it in dm.datasets["train"].items] == \
        [("0001.jpg", 0), ("0002.jpg", 1), ("0003.jpg", 2), ("0004.jpg", 0)]
    assert len(dm.datasets["val"]) == 3 and len(dm.datasets["test"]) == 3
    (root / "images_variant_test.txt").write_text("0008 Boeing 999\n")
    with pytest.raises(DataError, match="variant 'Boeing 999' of image 0008 is not in variants.txt"):
        ImageFolderDataModule(root=str(root), layout="fgvc_aircraft").check()


def test_imagenet_layout(tmp_path):
    root = tmp_path / "imagenet"
    root.mkdir()
    (root / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    for split, n in (("train", 3), ("val", 2)):
        for wnid in ("n01484850", "n01440764", "n01443537"):
            for i in range(n):
                _jpg(root / "images" / split / wnid / f"{wnid}_{i}.JPEG", (i * 40, 0, 0))
    dm = ImageFolderDataModule(root=str(root), layout="imagenet", shots=2, seed=1)
    dm.setup()
    assert dm.info()["classnames"] == ["tench", "goldfish", "great white shark"]  # sorted wnids
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["test"]) == 6
    assert "val" not in dm.datasets  # official: val = test, so no honest validation split
    labels = [it["label"] for it in dm.datasets["test"].items]
    assert labels == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError, match="no 'val' split"):
        dm.val_dataloader()


# ---------------------------------------------------------------------------- one config per CoOp dataset
COOP = {"caltech101": "split_zhou_Caltech101.json", "dtd": "split_zhou_DescribableTextures.json",
        "eurosat": "split_zhou_EuroSAT.json", "fgvc_aircraft": None, "food101": "split_zhou_Food101.json",
        "imagenet": None, "oxford_flowers": "split_zhou_OxfordFlowers.json", "oxford_pets": "split_zhou_OxfordPets.json",
        "stanford_cars": "split_zhou_StanfordCars.json", "sun397": "split_zhou_SUN397.json",
        "ucf101": "split_zhou_UCF101.json"}


@pytest.mark.parametrize("name", sorted(COOP))
def test_every_coop_dataset_has_a_config(name):
    from prompttune.config import compose

    cfg = compose(None, ["method=coop", f"data=coop_{name}"])
    d = cfg.data
    assert d.split_file == COOP[name] and d.drop_last is True and d.shots == 16 and "{}" in d.template
    assert d.layout == {"fgvc_aircraft": "fgvc_aircraft", "imagenet": "imagenet"}.get(name, "split_json")
    assert d.batch_size == 32


# ---------------------------------------------------------------------------- zero-shot
class _DM:
    def __init__(self, **info):
        self._info = {"classnames": ["american_bulldog", "great_pyrenees"], "num_classes": 2, **info}

    def info(self):
        return self._info


def test_zero_shot_replaces_underscores_and_uses_the_dataset_template(tiny_clip):
    from prompttune.methods.zero_shot import ZeroShot

    z = ZeroShot()
    z.setup(tiny_clip, _DM(template="a photo of a {}, a type of pet."))
    assert z.used_templates == ["a photo of a {}, a type of pet."]
    with torch.no_grad():
        ref = tiny_clip.encode_text(tiny_clip.tokenize(["a photo of a american bulldog, a type of pet.",
                                                        "a photo of a great pyrenees, a type of pet."]))
    torch.testing.assert_close(z.text_features, torch.nn.functional.normalize(ref.float(), dim=-1))
    z2 = ZeroShot()
    z2.setup(tiny_clip, _DM())  # no dataset template: CLIP's generic one
    assert z2.used_templates == ["a photo of a {}."]


def test_zero_shot_ensemble_is_zeroshotclip2(tiny_clip):
    from prompttune.methods.zero_shot import IMAGENET_TEMPLATES_SELECT, ZeroShot, class_text_features

    z = ZeroShot(ensemble=True)
    z.setup(tiny_clip, _DM(template="{} texture.", coop_name="DescribableTextures"))
    assert z.used_templates == list(IMAGENET_TEMPLATES_SELECT) + ["{} texture."] and len(z.used_templates) == 8
    zi = ZeroShot(ensemble=True)
    zi.setup(tiny_clip, _DM(template="a photo of a {}.", coop_name="ImageNet"))
    assert zi.used_templates == list(IMAGENET_TEMPLATES_SELECT)  # zsclip.py: not added for ImageNet
    # the official average: mean of per-template normalised features, normalised again
    with torch.no_grad():
        per = [torch.nn.functional.normalize(tiny_clip.encode_text(tiny_clip.tokenize(
            [t.format(c) for c in ("american bulldog", "great pyrenees")])).float(), dim=-1) for t in z.used_templates]
    want = torch.nn.functional.normalize(sum(per) / len(per), dim=-1)
    torch.testing.assert_close(z.text_features, want)
    torch.testing.assert_close(class_text_features(tiny_clip, ["american_bulldog", "great_pyrenees"],
                                                   z.used_templates), want)


def test_zero_shot_bad_templates_rejected_at_compose():
    from prompttune.config import ConfigError, compose

    with pytest.raises(ConfigError, match="method.templates="):
        compose(None, ["method=zero_shot", "method.templates=[a photo]"])
