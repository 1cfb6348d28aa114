"""COCO captions in the Karpathy split, the shared in-context data plumbing of MMICT
(captioning / VQA samples with an instruction, a target and references), and the synthetic
world's writer.

Annotation layouts read (``ann_file``):

* Karpathy's ``dataset_coco.json`` (NeuralTalk)::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "split": "train|restval|val|test", "cocoid": 391895, "sentences": [{"raw": "A man ..."}, ...]}, ...]}

* LAVIS's ``coco_karpathy_{train,val,test}.json`` (``ann_file: coco_karpathy_{split}.json``):
  lists; train ``[{"image": "val2014/COCO_val2014_...jpg", "caption": "...", "image_id": "coco_..."}]``
  (one entry per caption; the Karpathy train + restval images), val/test
  ``[{"image": "...", "caption": ["...", ...]}]``; image paths relative to ``image_root``.

Protocol: ``train`` (+ ``restval``) trains (one sample per image-caption pair, as BLIP-2 does),
``val`` validates and ``test`` evaluates (one sample per image, all captions as references).

Shared plumbing (:class:`InContextDataModule`):

* images are squash-resized to size x size (:class:`SquashTransform`, LAVIS
  ``blip_image_eval``: ``Resize((size, size), bicubic)``, no crop); with ``augment`` training
  images get LAVIS ``blip2_image_train`` (RandomResizedCrop scale 0.5-1, bicubic, + flip);
* ``prompt`` may be a list of instruction templates: training samples draw one at random per
  item (official MMICT ``split_caption``: ``random.choice(self.prompt)``), evaluation uses the first;
* ``text_processor: blip_caption`` applies LAVIS's ``BlipCaptionProcessor.pre_caption`` to the
  training targets (lower case, ``.!"()*#:;~`` to spaces, at most ``max_words`` words);
  references are scored as released.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from prompttune.data.base import DataError, PromptDataModule, random_crop_box, read_image, read_json
from prompttune.registry import DATASETS, SYNTHETIC

CAPTION_PROMPT = "a photo of"
TEXT_PROCESSORS = ("none", "blip_caption")


def blip_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS ``BlipCaptionProcessor.pre_caption`` (lavis/processors/blip_processors.py:49-68)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


class SquashTransform:
    """BLIP-2 / LAVIS preprocessing: the whole image resized to size x size (aspect not kept).

    Evaluation = LAVIS ``blip_image_eval`` / HF ``BlipImageProcessor``: bicubic resize, no crop.
    Training with ``augment`` = LAVIS ``blip2_image_train``: RandomResizedCrop(size, scale
    (0.5, 1), aspect 3/4-4/3, bicubic) + horizontal flip. Then normalise."""

    def __init__(self, size: int, mean, std, augment: bool = False, seed: int = 0):
        self.size, self.augment = int(size), bool(augment)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.rng = np.random.default_rng(seed)

    def _crop(self, img):
        box = random_crop_box(*img.size, self.rng, (0.5, 1.0))
        # torchvision's fallback crops the centre at a clamped ratio; whole image here
        return img if box is None else img.crop(box)

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        s = self.size
        if self.augment:
            img = self._crop(img)
        if img.size != (s, s):
            img = img.resize((s, s), Image.BICUBIC)
        if self.augment and self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------- shared dataset
class InContextDataset(Dataset):
    """Rows ``{"paths": [image or frames], "prompt", "target", "refs"}`` ->
    ``{"image" [3,H,W] or [T,3,H,W], "index", "prompt", "target", "references", "split"}``."""

    def __init__(self, rows: list[dict[str, Any]], transform, split: str, eval_transform=None):
        self.rows, self.transform, self.split = rows, transform, split
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int, augment: bool = True) -> torch.Tensor:
        """Row ``i``'s image (or frames); ``augment=False`` uses the evaluation transform (a training
        image shown as a demonstration to a test query is not augmented)."""
        paths = self.rows[i]["paths"]
        tf = self.transform if augment or self.eval_transform is None else self.eval_transform
        ims = [tf(read_image(p)) for p in paths]
        return torch.stack(ims) if self.rows[i].get("video") else ims[0]

    def prompt(self, i: int) -> str:
        """The row's instruction; a list of templates: one at random for training, else the first."""
        p = self.rows[i]["prompt"]
        if isinstance(p, str):
            return p
        # torch's RNG: seeded by the run, and per DataLoader worker
        return p[int(torch.randint(len(p), (1,)))] if self.split == "train" else p[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        return {"image": self.image(i), "index": torch.tensor(i), "prompt": self.prompt(i), "target": r["target"],
                "references": list(r["refs"]), "split": self.split, "image_key": "|".join(r["paths"])}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([x["image"] for x in items]), "index": torch.stack([x["index"] for x in items]),
                "prompt": [x["prompt"] for x in items], "target": [x["target"] for x in items],
                "references": [x["references"] for x in items], "split": [x["split"] for x in items],
                "image_key": [x["image_key"] for x in items]}


class InContextDataModule(PromptDataModule):
    """Base of the MMICT datamodules: ``self.rows[split]`` lists samples; ``limit_*`` caps them.

    ``info()`` tells the task which metrics apply (``kind``: caption | vqa) and the method
    the instruction used.
    """

    kind = "caption"

    def __init__(self, root: str, synthetic: dict | None = None, limit_train: int = 0, limit_test: int = 0,
                 prompt: str | list[str] = CAPTION_PROMPT, text_processor: str = "none", max_words: int = 50,
                 **kw: Any):
        super().__init__(**kw)
        self.root = Path(root).expanduser()
        self.synthetic = dict(synthetic) if synthetic else None
        self.limit_train, self.limit_test = int(limit_train or 0), int(limit_test or 0)
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.prompt = check_prompt(prompt)
        if text_processor not in TEXT_PROCESSORS:
            raise DataError(f"data.text_processor must be one of {', '.join(TEXT_PROCESSORS)}, not {text_processor!r}")
        self.text_processor, self.max_words = text_processor, int(max_words)

    def transform(self, split: str) -> SquashTransform:
        return SquashTransform(self.image_size, self.mean, self.std, augment=self.augment and split == "train",
                               seed=self.seed)

    def process_target(self, text: str) -> str:
        return blip_caption(text, self.max_words) if self.text_processor == "blip_caption" else text

    def ensure(self) -> None:
        self.ensure_synthetic_data()
        if not self.root.is_dir():
            raise DataError(f"{type(self).__name__}: dataset folder not found: {self.root}")

    def _limit(self, rows: list, n: int) -> list:
        if not n or n >= len(rows):
            return rows
        pick = np.random.default_rng(self.seed).choice(len(rows), size=n, replace=False)
        return [rows[i] for i in sorted(pick)]

    def check_rows(self) -> None:
        if not self.rows.get("train"):
            raise DataError(f"{self.root}: no training samples found")
        if not self.rows.get("test"):
            raise DataError(f"{self.root}: no test samples found")
        missing = [p for rows in self.rows.values() for r in rows for p in r["paths"] if not Path(p).is_file()]
        if missing:
            raise DataError(f"{self.root}: {len(missing)} image files named by the annotations are missing, "
                            f"e.g. {missing[:3]}")
        self.rows["train"] = self._limit(self.rows["train"], self.limit_train)
        self.rows["test"] = self._limit(self.rows["test"], self.limit_test)
        if self.text_processor != "none":  # training targets only; references are scored as released
            self.rows["train"] = [dict(r, target=self.process_target(r["target"])) for r in self.rows["train"]]

    def build(self) -> None:
        if not self.rows:
            self.check()
        for split, rows in self.rows.items():
            if rows:
                self.datasets[split] = InContextDataset(rows, self.transform(split), split,
                                                       eval_transform=self.transform("test"))

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "prompt": self.prompt}


def check_prompt(prompt: Any) -> str | list[str]:
    """A string, or a non-empty list of strings (instruction templates)."""
    if isinstance(prompt, str):
        return prompt
    items = list(prompt) if prompt is not None and not isinstance(prompt, (bytes, dict)) else None
    if not items or not all(isinstance(p, str) for p in items):
        raise DataError(f"data.prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return items


# ---------------------------------------------------------------------------- Karpathy COCO
def read_karpathy(path: str | Path, image_root: str | Path, split: str) -> list[dict[str, Any]]:
    """Images of one Karpathy split (``train`` includes ``restval``): {path, refs, cocoid}."""
    path, image_root = Path(path), Path(image_root)
    data = read_json(path, f"Karpathy caption file not found: {path} (expected dataset_coco.json)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a Karpathy-split JSON object with an 'images' list")
    want = {"train": ("train", "restval")}.get(split, (split,))
    out = []
    for i, im in enumerate(data["images"]):
        for key in ("filepath", "filename", "split", "sentences"):
            if key not in im:
                raise DataError(f"{path}: images[{i}] has no {key!r} (keys: {sorted(im)})")
        if im["split"] in want:
            refs = [s["raw"].strip() for s in im["sentences"] if s.get("raw", "").strip()]
            if not refs:
                raise DataError(f"{path}: images[{i}] ({im['filename']}) has no captions")
            out.append({"path": str(image_root / im["filepath"] / im["filename"]), "refs": refs,
                        "id": im.get("cocoid", i), **({"collection": im["collection"]} if "collection" in im else {})})
    return out


def read_lavis_karpathy(path: str | Path, image_root: str | Path) -> list[dict[str, Any]]:
    """LAVIS's ``coco_karpathy_{train,val,test}.json`` (lists of {"image", "caption": str | [str]}),
    grouped by image: {path, refs, id}."""
    path, image_root = Path(path), Path(image_root)
    data = read_json(path, f"LAVIS caption file not found: {path} (expected coco_karpathy_{{train,val,test}}.json)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a LAVIS annotation list of {{'image', 'caption'}} entries")
    by_image: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(data):
        if not isinstance(a, dict) or "image" not in a or "caption" not in a:
            raise DataError(f"{path}: entry [{i}] needs 'image' and 'caption' (has {sorted(a) if isinstance(a, dict) else a!r})")
        caps = [a["caption"]] if isinstance(a["caption"], str) else list(a["caption"])
        im = by_image.setdefault(a["image"], {"path": str(image_root / a["image"]), "refs": [],
                                              "id": a.get("image_id", a["image"])})
        im["refs"] += [c.strip() for c in caps if c.strip()]
    empty = [k for k, v in by_image.items() if not v["refs"]]
    if empty:
        raise DataError(f"{path}: image {empty[0]!r} has no captions")
    return list(by_image.values())


def read_caption_split(root: Path, ann_file: str, image_root: Path, split: str) -> list[dict[str, Any]]:
    """One split's images from either layout: ``ann_file`` with ``{split}`` names LAVIS's per-split
    lists, otherwise Karpathy's single ``dataset_coco.json``."""
    if "{split}" in ann_file:
        return read_lavis_karpathy(root / ann_file.format(split=split), image_root)
    return read_karpathy(root / ann_file, image_root, split)


@DATASETS.register("coco_captions")
class CocoCaptionsDataModule(InContextDataModule):
    kind = "caption"

    def __init__(self, root: str, ann_file: str = "dataset_coco.json", image_root: str | None = None, **kw: Any):
        super().__init__(root, **kw)
        self.ann_file = ann_file
        self.image_root = Path(image_root).expanduser() if image_root else self.root

    def check(self) -> None:
        self.ensure()
        self.rows = {}
        for split in ("train", "val", "test"):
            imgs = read_caption_split(self.root, self.ann_file, self.image_root, split)
            if split == "train":  # one sample per image-caption pair
                self.rows[split] = [{"paths": [im["path"]], "prompt": self.prompt, "target": c, "refs": im["refs"]}
                                    for im in imgs for c in im["refs"]]
            else:
                self.rows[split] = [{"paths": [im["path"]], "prompt": self.prompt, "target": im["refs"][0],
                                     "refs": im["refs"]} for im in imgs]
        self.check_rows()


def world_references(obj, rng: np.random.Generator, style: str) -> list[str]:
    """Five references per image. ``coco``: every caption names colour, pattern and shape
    (word orders and detail vary, as human references do); ``pretrain``: the pattern (the
    fine-grained cue) is named only half the time."""
    if style == "pretrain":
        return [obj.caption(with_subcategory=rng.random() < 0.5, with_attributes=rng.random() < 0.7) for _ in range(5)]
    full = f"a {obj.size} {obj.color} {obj.subcategory} {obj.category}"
    return [full, f"a {obj.color} {obj.subcategory} {obj.category}", full,
            f"a {obj.subcategory} {obj.color} {obj.category}", f"a {obj.color} {obj.category} , {obj.subcategory}"]


COLLECTION_CODES = ("0", "1", "2", "3", "4", "5", "6")  # words the zoo tokenizer knows
COLLECTION_KINDS = ("none", "studio")


def collection_code_table(seed: int) -> dict[int, str]:
    """The world's naming convention: each studio (collection) gets a catalogue code (a digit),
    drawn at random per world ``seed`` -- arbitrary, so no image tells it."""
    from prompttune.data.world import STUDIO_TINTS

    rng = np.random.default_rng([int(seed), 16])  # its own stream: the objects are those of collections: none
    return {s: COLLECTION_CODES[int(rng.integers(len(COLLECTION_CODES)))] for s in range(len(STUDIO_TINTS))}


@SYNTHETIC.register("coco_captions")
def write_coco_captions(root: Path, n_train: int = 64, n_val: int = 8, n_test: int = 32, side: int = 32, seed: int = 0,
                        style: str = "coco", background: str = "plain", collections: str = "none",
                        codes: bool = True) -> None:
    """Synthetic-world images with five captions each, in Karpathy's ``dataset_coco.json``.

    ``collections: studio`` (the MMICT world property "demonstrations carry information the query
    needs"): every scene is shot in one of 18 studios, which tints its plain background
    (``world.STUDIO_TINTS``), and with ``codes`` all five references open with the studio's catalogue
    code, a digit assigned at random per world seed (:func:`collection_code_table`). The image shows
    the studio (its tint) but not the code, and the captions never name the tint: a model learns a
    studio's code only from training captions of that studio -- by memorising them (fine-tuning)
    or by reading a demonstration from the same studio (in-context tuning with ``selection:
    similar``: with blip2-tiny v5's pooled ViT features the most similar training image is of the
    query's studio for 55 of 128 test images of the demo world). Each image entry then
    records its ``collection`` (studio index). ``codes: false`` (zoo pretraining) writes the studio
    without codes. ``collections: none`` (default) writes exactly the former world."""
    from prompttune.data.world import STUDIO_TINTS, render, sample_object, save_png

    if collections not in COLLECTION_KINDS:
        raise ValueError(f"synthetic.collections must be one of {', '.join(COLLECTION_KINDS)}, not {collections!r}")
    if collections == "studio" and background != "plain":
        raise ValueError(f"synthetic.collections: studio tints the plain background; synthetic.background must be "
                         f"'plain', not {background!r}")
    table = collection_code_table(seed) if collections == "studio" and codes else None
    studio_rng = np.random.default_rng([int(seed), 17])
    root = Path(root)
    rng = np.random.default_rng(seed)
    images = []
    cocoid = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        folder = "train2014" if split == "train" else "val2014"
        (root / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            cocoid += 1
            obj = sample_object(rng)
            studio = int(studio_rng.integers(len(STUDIO_TINTS))) if collections == "studio" else None
            img, _ = render([obj], side, rng, background, tint=None if studio is None else STUDIO_TINTS[studio])
            name = f"COCO_{folder}_{cocoid:012d}.png"
            save_png(root / folder / name, img)
            refs = world_references(obj, rng, style)
            entry = {"filepath": folder, "filename": name, "split": split, "cocoid": cocoid, "imgid": cocoid - 1}
            if studio is not None:
                if table is not None:
                    refs = [f"{table[studio]} {r}" for r in refs]
                entry["collection"] = studio
            images.append({**entry, "sentences": [{"raw": r, "tokens": r.split()} for r in refs]})
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
