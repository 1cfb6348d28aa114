"""Pascal VOC single-object detection as visual in-context segmentation (Bar et al.; InMeMo Sec. 4).

Layout (VOC2012 as distributed)::

    <root>/VOC2012/JPEGImages/<id>.jpg
    <root>/VOC2012/Annotations/<id>.xml          VOC XML: <size>, <object><name>, <bndbox>
    <root>/VOC2012/ImageSets/Main/train.txt     in-context pool and training queries
    <root>/VOC2012/ImageSets/Main/val.txt       test queries

As the official ``evaluate_detection/voc_orig.py``: only images with exactly one object are
kept; test images are further kept only when the box covers less than ``max_area_frac`` (0.2)
of the image; boxes use 0-based coordinates (``xmin - 1``, ``ymin - 1``). The label is the box
rendered as a filled white rectangle on black (``get_annotated_image(mode='keep', fg='white')``).
Images and box masks are resized to the cell bilinearly (``evaluate_detection/transforms.py:117``:
``F.resize`` with torchvision's default interpolation; ``data.interpolation`` selects bicubic).
The official metric (``test/miou_official``) replaces the rounded prediction by the box of its
largest white component (``evaluate_detection/box_ops.py`` ``to_rectangle``), see the task.
Departure: the official pool list ``support_set_for_val.txt`` is a fixed file; here the pool is
the filtered ``train.txt``, and the method picks each query's pair from it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import DataError, check_folder
from prompttune.data.pascal5i import VOC_CLASSES, EpisodicDataModule, _class_names
from prompttune.registry import DATASETS, SYNTHETIC


def parse_voc_xml(path: Path) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"annotation {path} is not valid VOC XML: {err}") from None
    size = root.find("size")
    try:
        w, h = int(size.findtext("width")), int(size.findtext("height"))
        objs = []
        for o in root.findall("object"):
            bb = o.find("bndbox")
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            box[0] -= 1.0
            box[1] -= 1.0
            objs.append({"name": o.findtext("name").strip(), "box": box})
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"annotation {path} lacks <size><width>/<height> or an object's <name>/<bndbox>") from None
    return {"width": w, "height": h, "objects": objs}


@DATASETS.register("voc_detection")
class VOCDetectionDataModule(EpisodicDataModule):
    kind = "detection"  # the task's official metric boxes the prediction (to_rectangle)
    default_interpolation = "bilinear"  # evaluate_detection/transforms.py:117 F.resize (torchvision default)

    def __init__(self, root: str, voc_dir: str = "VOC2012", max_area_frac: float = 0.2, **kw: Any):
        super().__init__(root, **kw)
        self.voc_dir, self.max_area_frac = voc_dir, float(max_area_frac)
        self.classnames: list[str] = []

    def _read(self, split: str, names: list[str]) -> list[dict]:
        voc = self.root / self.voc_dir
        lst = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"VOC image list not found: {lst} (expected one image id per line)")
        items = []
        for iid in (x.strip() for x in lst.read_text().splitlines()):
            if not iid:
                continue
            ann, img = voc / "Annotations" / f"{iid}.xml", voc / "JPEGImages" / f"{iid}.jpg"
            if not ann.is_file() or not img.is_file():
                raise DataError(f"{lst} lists {iid!r} but {ann if not ann.is_file() else img} is missing")
            a = parse_voc_xml(ann)
            if len(a["objects"]) != 1:
                continue  # keep_single_objs_only
            o = a["objects"][0]
            if o["name"] not in names:
                raise DataError(f"{ann}: unknown class {o['name']!r}; valid: {', '.join(names)}")
            x0, y0, x1, y1 = o["box"]
            frac = (x1 - x0) * (y1 - y0) / max(a["width"] * a["height"], 1)
            if split == "val" and frac >= self.max_area_frac:
                continue  # filter_by_mask_size (val only)
            items.append({"id": iid, "path": str(img), "class": names.index(o["name"]), "box": o["box"],
                          "size": (a["width"], a["height"])})
        return items

    def read_items(self) -> dict[str, list[dict]]:
        check_folder(self.root, "Pascal VOC", f"{self.voc_dir}/JPEGImages, Annotations, ImageSets/Main")
        names = _class_names(self.root)
        self.classnames = names
        train, val = self._read("train", names), self._read("val", names)
        return {"pool": train, "train": train, "test": val}

    def load_mask(self, item: dict, size: tuple[int, int]) -> np.ndarray:
        w, h = size
        if tuple(item["size"]) != (w, h):
            raise DataError(f"{item['path']} is {w}x{h} but its annotation says {item['size'][0]}x{item['size'][1]}")
        x0, y0, x1, y1 = (int(v) for v in item["box"])
        m = np.zeros((h, w), dtype=bool)
        m[max(y0, 0):y1, max(x0, 0):x1] = True
        return m


@SYNTHETIC.register("voc_detection")
def write_voc_detection(root: Path, n_train: int = 80, n_val: int = 60, side: int = 48, seed: int = 0,
                        multi_frac: float = 0.15, background: str = "noise") -> None:
    """VOC layout from the synthetic world: one-object scenes (some with two, which the loader drops)."""
    from PIL import Image

    from prompttune.data.pascal5i import synthetic_classes
    from prompttune.data.world import CATEGORIES, SUBCATEGORIES, render, sample_object

    root = Path(root)
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names = synthetic_classes()
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        for i in range(n):
            cls = i % len(names)
            fold, shape = divmod(cls, 4)
            size = "small" if split == "val" and rng.random() < 0.8 else None
            objs = [sample_object(rng, category=CATEGORIES[shape], subcategory=SUBCATEGORIES[fold], size=size)]
            if rng.random() < multi_frac:
                objs.append(sample_object(rng, size="small"))
            img, _ = render(objs, side, rng, background)
            iid = f"2099_{k:06d}"
            k += 1
            Image.fromarray(img).save(voc / "JPEGImages" / f"{iid}.jpg", quality=95)
            xml = [f"<annotation><filename>{iid}.jpg</filename><size><width>{side}</width><height>{side}</height>"
                   "<depth>3</depth></size>"]
            for o in objs:
                if o.box[2] <= o.box[0]:
                    continue
                x0, y0, x1, y1 = o.box
                nm = f"{o.subcategory} {o.category}"
                xml.append(f"<object><name>{nm}</name><difficult>0</difficult><bndbox><xmin>{int(x0) + 1}</xmin>"
                           f"<ymin>{int(y0) + 1}</ymin><xmax>{int(x1)}</xmax><ymax>{int(y1)}</ymax></bndbox></object>")
            xml.append("</annotation>")
            (voc / "Annotations" / f"{iid}.xml").write_text("".join(xml))
            ids.append(iid)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classnames.txt").write_text("\n".join(names) + "\n")


__all__ = ["VOCDetectionDataModule", "VOC_CLASSES", "parse_voc_xml"]
