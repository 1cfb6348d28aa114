"""COCO Karpathy, VQAv2 and frame-folder video loaders over the synthetic writers' real formats."""

import json

import pytest
import torch

from prompttune.data.base import DataError
from prompttune.data.coco_captions import CocoCaptionsDataModule, InContextDataset, read_karpathy, write_coco_captions
from prompttune.data.image_folder import ensure_synthetic
from prompttune.data.video_frames import VideoFramesDataModule, sample_frames, write_video_frames
from prompttune.data.vqav2 import VQAv2DataModule, read_vqav2, write_vqav2

PNG = "{split}2014/COCO_{split}2014_{image_id:012d}.png"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_captions(root, n_train=6, n_val=2, n_test=3, seed=0)
    return root


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    write_vqav2(root, n_train=8, n_val=4, seed=0, p_counting=0.5)
    return root


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    write_video_frames(root, n_train=3, n_val=1, n_test=2, frames=5, seed=0)
    return root


def test_karpathy_layout_and_datamodule(coco):
    data = json.loads((coco / "dataset_coco.json").read_text())
    im = data["images"][0]
    assert {"filepath", "filename", "split", "cocoid", "sentences"} <= set(im)
    assert im["filename"].startswith("COCO_train2014_") and len(im["sentences"]) == 5
    dm = CocoCaptionsDataModule(root=str(coco), batch_size=4, eval_batch_size=3)
    dm.image_size = 32
    dm.check()
    dm.setup()
    assert len(dm.datasets["train"]) == 6 * 5  # one sample per image-caption pair
    assert len(dm.datasets["test"]) == 3  # one per image, all references
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (3, 3, 32, 32)
    assert batch["prompt"] == ["a photo of"] * 3 and all(len(r) == 5 for r in batch["references"])
    assert batch["split"] == ["test"] * 3
    train = next(iter(dm.train_dataloader()))
    assert len(train["target"]) == 4 and all(t in r for t, r in zip(train["target"], train["references"]))
    assert dm.info()["kind"] == "caption"


def test_karpathy_train_includes_restval(tmp_path, coco):
    data = json.loads((coco / "dataset_coco.json").read_text())
    data["images"][0]["split"] = "restval"
    (tmp_path / "d.json").write_text(json.dumps(data))
    assert len(read_karpathy(tmp_path / "d.json", coco, "train")) == 6


def test_vqav2_layout_and_datamodule(vqa):
    qs = json.loads((vqa / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    anns = json.loads((vqa / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    assert {"image_id", "question", "question_id"} <= set(qs[0])
    assert all(len(a["answers"]) == 10 for a in anns)
    rows = read_vqav2(vqa, "val", PNG)
    assert len(rows) == 4 and all(r["answer"] == r["answers"][0] for r in rows)
    dm = VQAv2DataModule(root=str(vqa), image_pattern=PNG, batch_size=8, eval_batch_size=4)
    dm.image_size = 32
    dm.check()
    dm.setup()
    b = next(iter(dm.test_dataloader()))  # val2014 is the test split
    assert b["image"].shape == (4, 3, 32, 32)
    assert all(p.startswith("Question: ") and p.endswith(" Answer:") for p in b["prompt"])
    assert all(len(r) == 10 for r in b["references"])
    assert dm.info()["kind"] == "vqa"


def test_video_frames_layout_and_datamodule(video):
    info = json.loads((video / "videodatainfo.json").read_text())
    assert {v["split"] for v in info["videos"]} == {"train", "validate", "test"}
    assert len(list((video / "frames" / "video0").glob("*.png"))) == 5
    dm = VideoFramesDataModule(root=str(video), num_frames=3, batch_size=2, eval_batch_size=2)
    dm.image_size = 32
    dm.check()
    dm.setup()
    b = next(iter(dm.test_dataloader()))
    assert b["image"].shape == (2, 3, 3, 32, 32)  # [B, T, 3, H, W]
    assert len(dm.datasets["train"]) == 3 * 3  # three captions per clip
    assert "moves" in b["references"][0][0] or "moving" in b["references"][0][0]


def test_sample_frames_uniform_and_padded():
    fr = list(range(10))
    assert sample_frames(fr, 4) == [0, 3, 6, 9]
    assert sample_frames([0, 1], 4) == [0, 1, 1, 1]


def test_synthetic_spec_generates_once(tmp_path):
    spec = {"kind": "coco_captions", "n_train": 2, "n_val": 0, "n_test": 1, "seed": 3}
    dm = CocoCaptionsDataModule(root=str(tmp_path / "c"), synthetic=spec)
    dm.check()
    assert len(dm.rows["train"]) == 10 and len(dm.rows["test"]) == 1
    ensure_synthetic(spec, tmp_path / "c")  # same spec: no-op


# ---------------------------------------------------------------------------- bad input
def test_missing_and_corrupt_annotation_files(tmp_path, coco):
    with pytest.raises(DataError, match="Karpathy caption file not found: .*nope.json"):
        read_karpathy(tmp_path / "nope.json", tmp_path, "train")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not valid JSON"):
        read_karpathy(tmp_path / "bad.json", tmp_path, "train")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="expected a Karpathy-split JSON object with an 'images' list"):
        read_karpathy(tmp_path / "list.json", tmp_path, "train")
    data = json.loads((coco / "dataset_coco.json").read_text())
    del data["images"][1]["sentences"]
    (tmp_path / "nosent.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\] has no 'sentences'"):
        read_karpathy(tmp_path / "nosent.json", coco, "train")


def test_missing_images_fail_before_compute(tmp_path, coco):
    data = json.loads((coco / "dataset_coco.json").read_text())
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))  # annotations without images
    dm = CocoCaptionsDataModule(root=str(tmp_path))
    with pytest.raises(DataError, match="image files named by the annotations are missing"):
        dm.check()
    with pytest.raises(DataError, match="dataset folder not found"):
        CocoCaptionsDataModule(root=str(tmp_path / "absent")).check()


def test_vqav2_bad_layouts(tmp_path, vqa):
    with pytest.raises(DataError, match="VQAv2 file not found: .*v2_OpenEnded_mscoco_train2014_questions.json"):
        read_vqav2(tmp_path, "train")
    with pytest.raises(DataError, match="data.prompt must contain"):
        VQAv2DataModule(root=str(vqa), prompt="Question: Answer:")
    anns = json.loads((vqa / "v2_mscoco_train2014_annotations.json").read_text())
    for name in ("v2_OpenEnded_mscoco_train2014_questions.json",):
        (tmp_path / name).write_text((vqa / name).read_text())
    anns["annotations"] = anns["annotations"][1:]
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(anns))
    with pytest.raises(DataError, match="question 1 of train has no annotation"):
        read_vqav2(tmp_path, "train", PNG)


def test_video_bad_layouts(tmp_path, video):
    info = json.loads((video / "videodatainfo.json").read_text())
    (tmp_path / "videodatainfo.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="no frames for video 'video0'"):
        VideoFramesDataModule(root=str(tmp_path)).check()
    info["videos"][0]["split"] = "dev"
    (tmp_path / "videodatainfo.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="has split 'dev'; expected train, validate or test"):
        VideoFramesDataModule(root=str(tmp_path)).check()
    with pytest.raises(DataError, match="num_frames must be >= 1"):
        VideoFramesDataModule(root=str(video), num_frames=0)


def test_collate_keeps_strings_as_lists():
    items = [{"image": torch.zeros(3, 2, 2), "index": torch.tensor(i), "prompt": "p", "target": f"t{i}",
              "references": ["r"], "split": "train"} for i in range(2)]
    b = InContextDataset.collate(items)
    assert b["image"].shape == (2, 3, 2, 2) and b["target"] == ["t0", "t1"] and b["index"].tolist() == [0, 1]
