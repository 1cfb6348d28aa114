"""COCO captions in the Karpathy split (``dataset_coco.json``), the shared in-context data
plumbing of MMICT (captioning / VQA samples with an instruction, a target and references),
and the synthetic world's writer for this format.

Karpathy JSON (as released with NeuralTalk, used by BLIP/LAVIS)::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "split": "train|restval|val|test", "cocoid": 391895, "sentences": [{"raw": "A man ..."}, ...]}, ...]}

Protocol: ``train`` + ``restval`` train (one sample per image-caption pair, as BLIP-2 does),
``val`` validates and ``test`` evaluates (one sample per image, all captions as references).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from prompttune.data.base import DataError, PromptDataModule, read_image
from prompttune.registry import DATASETS, SYNTHETIC

CAPTION_PROMPT = "a photo of"


# ---------------------------------------------------------------------------- shared dataset
class InContextDataset(Dataset):
    """Rows ``{"paths": [image or frames], "prompt", "target", "refs"}`` ->
    ``{"image" [3,H,W] or [T,3,H,W], "index", "prompt", "target", "references", "split"}``."""

    def __init__(self, rows: list[dict[str, Any]], transform, split: str):
        self.rows, self.transform, self.split = rows, transform, split

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        paths = self.rows[i]["paths"]
        ims = [self.transform(read_image(p)) for p in paths]
        return torch.stack(ims) if self.rows[i].get("video") else ims[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        return {"image": self.image(i), "index": torch.tensor(i), "prompt": r["prompt"], "target": r["target"],
                "references": list(r["refs"]), "split": self.split}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([x["image"] for x in items]), "index": torch.stack([x["index"] for x in items]),
                "prompt": [x["prompt"] for x in items], "target": [x["target"] for x in items],
                "references": [x["references"] for x in items], "split": [x["split"] for x in items]}


class InContextDataModule(PromptDataModule):
    """Base of the MMICT datamodules: ``self.rows[split]`` lists samples; ``limit_*`` caps them.

    ``info()`` tells the task which metrics apply (``kind``: caption | vqa) and the method
    the instruction used.
    """

    kind = "caption"

    def __init__(self, root: str, synthetic: dict | None = None, limit_train: int = 0, limit_test: int = 0, **kw: Any):
        super().__init__(**kw)
        self.root = Path(root).expanduser()
        self.synthetic = dict(synthetic) if synthetic else None
        self.limit_train, self.limit_test = int(limit_train or 0), int(limit_test or 0)
        self.rows: dict[str, list[dict[str, Any]]] = {}

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

    def build(self) -> None:
        if not self.rows:
            self.check()
        for split, rows in self.rows.items():
            if rows:
                self.datasets[split] = InContextDataset(rows, self.transform(split), split)

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind}


# ---------------------------------------------------------------------------- Karpathy COCO
def read_karpathy(path: str | Path, image_root: str | Path, split: str) -> list[dict[str, Any]]:
    """Images of one Karpathy split (``train`` includes ``restval``): {path, refs, cocoid}."""
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise DataError(f"Karpathy caption file not found: {path} (expected dataset_coco.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
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
                        "id": im.get("cocoid", i)})
    return out


@DATASETS.register("coco_captions")
class CocoCaptionsDataModule(InContextDataModule):
    kind = "caption"

    def __init__(self, root: str, ann_file: str = "dataset_coco.json", image_root: str | None = None,
                 prompt: str = CAPTION_PROMPT, **kw: Any):
        super().__init__(root, **kw)
        self.ann_file, self.prompt = ann_file, prompt
        self.image_root = Path(image_root).expanduser() if image_root else self.root

    def check(self) -> None:
        self.ensure()
        ann = self.root / self.ann_file
        self.rows = {}
        for split in ("train", "val", "test"):
            imgs = read_karpathy(ann, self.image_root, split)
            if split == "train":  # one sample per image-caption pair
                self.rows[split] = [{"paths": [im["path"]], "prompt": self.prompt, "target": c, "refs": im["refs"]}
                                    for im in imgs for c in im["refs"]]
            else:
                self.rows[split] = [{"paths": [im["path"]], "prompt": self.prompt, "target": im["refs"][0],
                                     "refs": im["refs"]} for im in imgs]
        self.check_rows()

    def info(self) -> dict[str, Any]:
        return {"kind": "caption", "prompt": self.prompt}


def world_references(obj, rng: np.random.Generator, style: str) -> list[str]:
    """Five references per image. ``coco``: every caption names colour, pattern and shape
    (word orders and detail vary, as human references do); ``pretrain``: the pattern (the
    fine-grained cue) is named only half the time."""
    if style == "pretrain":
        return [obj.caption(with_subcategory=rng.random() < 0.5, with_attributes=rng.random() < 0.7) for _ in range(5)]
    full = f"a {obj.size} {obj.color} {obj.subcategory} {obj.category}"
    return [full, f"a {obj.color} {obj.subcategory} {obj.category}", full,
            f"a {obj.subcategory} {obj.color} {obj.category}", f"a {obj.color} {obj.category} , {obj.subcategory}"]


@SYNTHETIC.register("coco_captions")
def write_coco_captions(root: Path, n_train: int = 64, n_val: int = 8, n_test: int = 32, side: int = 32, seed: int = 0,
                        style: str = "coco", background: str = "plain") -> None:
    """Synthetic-world images with five captions each, in Karpathy's ``dataset_coco.json``."""
    from prompttune.data.world import render, sample_object, save_png

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
            img, _ = render([obj], side, rng, background)
            name = f"COCO_{folder}_{cocoid:012d}.png"
            save_png(root / folder / name, img)
            refs = world_references(obj, rng, style)
            images.append({"filepath": folder, "filename": name, "split": split, "cocoid": cocoid, "imgid": cocoid - 1,
                           "sentences": [{"raw": r, "tokens": r.split()} for r in refs]})
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
