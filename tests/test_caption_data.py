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
              "references": ["r"], "split": "train", "image_key": f"k{i}"} for i in range(2)]
    b = InContextDataset.collate(items)
    assert b["image"].shape == (2, 3, 2, 2) and b["target"] == ["t0", "t1"] and b["index"].tolist() == [0, 1]
    assert b["image_key"] == ["k0", "k1"]


# ---------------------------------------------------------------------------- real release layouts
def test_lavis_coco_karpathy_lists(tmp_path, coco):
    """LAVIS's coco_karpathy_{train,val,test}.json: train one entry per caption, val/test caption lists."""
    from prompttune.data.coco_captions import read_lavis_karpathy

    data = json.loads((coco / "dataset_coco.json").read_text())
    lists = {"train": [], "val": [], "test": []}
    for im in data["images"]:
        rel = f"{im['filepath']}/{im['filename']}"
        caps = [s["raw"] for s in im["sentences"]]
        if im["split"] == "train":
            lists["train"] += [{"caption": c, "image": rel, "image_id": f"coco_{im['cocoid']}"} for c in caps]
        else:
            lists[im["split"]].append({"image": rel, "caption": caps})
    for split, items in lists.items():
        (tmp_path / f"coco_karpathy_{split}.json").write_text(json.dumps(items))
    imgs = read_lavis_karpathy(tmp_path / "coco_karpathy_train.json", coco)
    assert len(imgs) == 6 and all(len(i["refs"]) == 5 for i in imgs)  # regrouped by image
    dm = CocoCaptionsDataModule(root=str(tmp_path), ann_file="coco_karpathy_{split}.json", image_root=str(coco))
    dm.image_size = 32
    dm.check()
    ref = CocoCaptionsDataModule(root=str(coco))
    ref.image_size = 32
    ref.check()
    for split in ("train", "val", "test"):  # the same samples as from dataset_coco.json
        assert [(r["paths"], r["target"], r["refs"]) for r in dm.rows[split]] == \
               [(r["paths"], r["target"], r["refs"]) for r in ref.rows[split]]
    (tmp_path / "coco_karpathy_val.json").write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(DataError, match=r"entry \[0\] needs 'image' and 'caption'"):
        dm.check()
    (tmp_path / "coco_karpathy_val.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="expected a LAVIS annotation list"):
        dm.check()


def _msrvtt_release(root, video):
    """Split the synthetic videodatainfo.json the way MSR-VTT ships: train_val_ + test_ files."""
    info = json.loads((video / "videodatainfo.json").read_text())
    test_ids = {v["video_id"] for v in info["videos"] if v["split"] == "test"}
    for name, keep in (("train_val_videodatainfo.json", lambda vid: vid not in test_ids),
                       ("test_videodatainfo.json", lambda vid: vid in test_ids)):
        part = {"info": {}, "videos": [dict(v, url="u", category=0) for v in info["videos"] if keep(v["video_id"])],
                "sentences": [dict(s, sen_id=i) for i, s in enumerate(info["sentences"]) if keep(s["video_id"])]}
        (root / name).write_text(json.dumps(part))


def test_msrvtt_release_files_are_read_directly(tmp_path, video):
    import shutil

    shutil.copytree(video / "frames", tmp_path / "frames")
    _msrvtt_release(tmp_path, video)
    dm = VideoFramesDataModule(root=str(tmp_path), ann_file=["train_val_videodatainfo.json", "test_videodatainfo.json"],
                               num_frames=3)
    dm.image_size = 32
    dm.check()
    ref = VideoFramesDataModule(root=str(video), num_frames=3)
    ref.image_size = 32
    ref.check()
    assert {s: len(r) for s, r in dm.rows.items()} == {s: len(r) for s, r in ref.rows.items()} == \
        {"train": 9, "val": 1, "test": 2}
    assert [r["refs"] for r in dm.rows["test"]] == [r["refs"] for r in ref.rows["test"]]
    with pytest.raises(DataError, match="listed twice"):
        VideoFramesDataModule(root=str(tmp_path), ann_file=["test_videodatainfo.json", "test_videodatainfo.json"]).check()


def test_msvd_annotations_and_mapping(tmp_path, video):
    """MSVD's annotations.txt ('<youtube clip> <caption>') + youtube_mapping.txt ('<clip> vidN'),
    frames named by clip or by vidN; the standard 1200/100/670 split by vid number."""
    import shutil

    from prompttune.data.video_frames import read_video_captions

    clips = {"vid1": "abc_1_5", "vid1200": "-xyz_0_9", "vid1201": "q1_2_3", "vid1301": "zz_4_8", "vid1970": "last_1_2"}
    src = sorted((video / "frames").iterdir())
    for i, (vid, clip) in enumerate(clips.items()):
        shutil.copytree(src[i], tmp_path / "frames" / (clip if i % 2 else vid))
    (tmp_path / "youtube_mapping.txt").write_text("".join(f"{c} {v}\n" for v, c in clips.items()))
    lines = ["# MSVD descriptions", ""] + [f"{c} a {v} clip moves" for v, c in clips.items()] + ["vid1 another caption"]
    (tmp_path / "annotations.txt").write_text("\n".join(lines) + "\n")
    out = read_video_captions(tmp_path, "annotations.txt", "frames", 2, layout="msvd", mapping_file="youtube_mapping.txt")
    assert {k: len(v) for k, v in out.items()} == {"train": 2, "val": 1, "test": 2}
    assert sorted(len(v["refs"]) for v in out["train"]) == [1, 2]
    dm = VideoFramesDataModule(root=str(tmp_path), layout="msvd", ann_file="annotations.txt",
                               mapping_file="youtube_mapping.txt", num_frames=2)
    dm.image_size = 32
    dm.check()
    assert len(dm.rows["train"]) == 3 and dm.rows["test"][0]["video"]
    (tmp_path / "annotations.txt").write_text("unknown_clip a caption\n")
    with pytest.raises(DataError, match="clip 'unknown_clip' is not in the mapping file"):
        read_video_captions(tmp_path, "annotations.txt", "frames", 2, layout="msvd", mapping_file="youtube_mapping.txt")
    (tmp_path / "annotations.txt").write_text("vid2000 a caption\n")
    with pytest.raises(DataError, match="outside MSVD's vid1-vid1970"):
        read_video_captions(tmp_path, "annotations.txt", "frames", 2, layout="msvd")
    with pytest.raises(DataError, match="data.layout must be one of msrvtt, msvd"):
        VideoFramesDataModule(root=str(tmp_path), layout="youcook")


# ---------------------------------------------------------------------------- instructions and text processing
def test_instruction_templates_and_blip_caption(coco):
    from prompttune.data.coco_captions import blip_caption

    # LAVIS BlipCaptionProcessor.pre_caption, by hand
    assert blip_caption('A man, in a "T-shirt"!  Riding: (fast)...') == "a man, in a t-shirt riding fast"
    assert blip_caption("one two three", max_words=2) == "one two"
    templates = ["A short image caption:", "An image that shows", "Write a short description for the image."]
    dm = CocoCaptionsDataModule(root=str(coco), prompt=templates, text_processor="blip_caption", batch_size=4)
    dm.image_size = 32
    dm.check()
    dm.setup()
    ds = dm.datasets["train"]
    torch.manual_seed(0)
    drawn = {ds[0]["prompt"] for _ in range(40)}
    assert drawn == set(templates)  # one template per training sample, at random
    assert {dm.datasets["test"][0]["prompt"] for _ in range(5)} == {templates[0]}  # evaluation: the first
    assert all(r["target"] == blip_caption(r["target"]) for r in dm.rows["train"])
    with pytest.raises(DataError, match="data.text_processor must be one of none, blip_caption"):
        CocoCaptionsDataModule(root=str(coco), text_processor="lower")
    with pytest.raises(DataError, match="data.prompt must be a string or a non-empty list of strings"):
        CocoCaptionsDataModule(root=str(coco), prompt=[])


def test_references_are_scored_as_released(coco):
    plain = CocoCaptionsDataModule(root=str(coco))
    plain.image_size = 32
    plain.check()
    proc = CocoCaptionsDataModule(root=str(coco), text_processor="blip_caption")
    proc.image_size = 32
    proc.check()
    assert [r["refs"] for r in proc.rows["test"]] == [r["refs"] for r in plain.rows["test"]]


def test_demonstration_images_are_not_augmented_at_evaluation(coco):
    dm = CocoCaptionsDataModule(root=str(coco), augment=True)
    dm.image_size = 32
    dm.check()
    dm.setup()
    ds = dm.datasets["train"]
    assert ds.transform.augment and not ds.eval_transform.augment
    assert torch.equal(ds.image(0, augment=False), ds.image(0, augment=False))
    from prompttune.data.base import read_image

    plain = dm.datasets["test"].transform(read_image(dm.rows["train"][0]["paths"][0]))
    assert torch.equal(ds.image(0, augment=False), plain)


# ---------------------------------------------------------------------------- MMICT studio world
def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_default_caption_world_is_unchanged_by_the_studio_option(tmp_path):
    """collections: none (the default) writes byte for byte what the writer wrote before the option
    existed (hashes from the previous commit's writer), and the default render is unchanged."""
    import numpy as np

    from prompttune.data.world import render, sample_object

    write_coco_captions(tmp_path, n_train=6, n_val=2, n_test=3, seed=0)
    assert _sha((tmp_path / "dataset_coco.json").read_bytes()) == \
        "f918e1fd8fb6587f1afb472e0bce9ec2290a7480ac56fedd0bb3b9c79b1c0e2f"
    pngs = b"".join(p.read_bytes() for p in sorted(tmp_path.rglob("*.png")))
    assert _sha(pngs) == "78653f0fc66f4320ffecdbf84c486b356fd6130323baa8ee88a9991526a89a7b"
    rng = np.random.default_rng(0)
    img, _ = render([sample_object(rng)], 32, rng, "plain")
    assert _sha(img.tobytes()) == "9c219893c023904d368f2cb9fc45f7d4250c523998442d9330611e98268fc811"


def test_studio_world_codes_open_every_reference_and_tint_the_background(tmp_path):
    import numpy as np
    from PIL import Image

    from prompttune.data.coco_captions import COLLECTION_CODES, collection_code_table
    from prompttune.data.world import STUDIO_TINTS

    plain, studio, nocode = tmp_path / "plain", tmp_path / "studio", tmp_path / "nocode"
    write_coco_captions(plain, n_train=10, n_val=0, n_test=6, seed=3)
    write_coco_captions(studio, n_train=10, n_val=0, n_test=6, seed=3, collections="studio")
    write_coco_captions(nocode, n_train=10, n_val=0, n_test=6, seed=3, collections="studio", codes=False)
    table = collection_code_table(3)
    assert len(table) == len(STUDIO_TINTS) == 18 and set(table.values()) <= set(COLLECTION_CODES)
    assert len(set(table.values())) > 1  # an arbitrary assignment, not one code for all
    ims = {k: json.loads((r / "dataset_coco.json").read_text())["images"] for k, r in
           (("plain", plain), ("studio", studio), ("nocode", nocode))}
    seen = set()
    for a, b, c in zip(ims["plain"], ims["studio"], ims["nocode"]):
        assert "collection" not in a and b["collection"] == c["collection"]
        code = table[b["collection"]]
        seen.add(b["collection"])
        for ra, rb, rc in zip(a["sentences"], b["sentences"], c["sentences"]):
            assert rb["raw"] == f"{code} {ra['raw']}"  # the same objects and references, the code first
            assert rc["raw"] == ra["raw"]
        px = np.asarray(Image.open(studio / b["filepath"] / b["filename"]), dtype=np.float32)
        border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
        assert np.abs(np.median(border, axis=0) - np.array(STUDIO_TINTS[b["collection"]])).max() < 16
    assert len(seen) > 3
    rows = read_karpathy(studio / "dataset_coco.json", studio, "test")
    assert all(isinstance(r["collection"], int) for r in rows)


def test_studio_world_bad_options_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="collections must be one of none, studio, not 'shape'"):
        write_coco_captions(tmp_path / "a", n_train=2, n_val=0, n_test=1, collections="shape")
    with pytest.raises(ValueError, match="background must be 'plain', not 'noise'"):
        write_coco_captions(tmp_path / "b", n_train=2, n_val=0, n_test=1, collections="studio", background="noise")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
