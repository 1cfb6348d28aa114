"""In-context pair selection for visual ICL: which pool image (and which of its labels) each query gets.

Strategies (``data.pair``):

* ``none``: no pair (the dataset blanks the support cells);
* ``random``: a seeded random pool image per query (never the query itself);
* ``retrieved``: the most similar pool image (InMeMo ``tools/calculate_similariity.py``: cosine
  similarity, top-1, the query itself skipped, ``trainer/train_pascal_dataloader.py``
  ``sample_episode_for_training``);
* ``random_same_class``: Bar et al.'s protocol (``evaluate/pascal_dataloader.py:142-153``): per
  *episode*, a random image of the query's class drawn from the query's own split list (the test
  list at test time), redrawn while it is the query, with ``np.random.choice(names, 1,
  replace=False)`` on a ``RandomState(seed)`` (the official global stream seeded once).

Similarity (``retriever``): ``timm:<model name>`` is the official retriever: timm's
``forward_features`` (every token, after the final norm) flattened per image, cosine over those
vectors ("pixel-level" features of ``vit_large_patch14_clip_224.laion2b``,
``tools/feature_extractor_folderwise_segmentation.py``), with that script's transform (Resize of
the shorter side, bicubic; CenterCrop; the model's mean/std). Any other value names a backbone
config whose pooled ``encode_image`` is used (the project's older default; cheaper).

Pool images listed under several classes (Pascal-5i's trn lists repeat an image once per class)
are ranked once; which of their labels is shown follows ``support_class``: ``official`` = the
query's class when the pool image lists it, else its first listed class, in training
(``train_pascal_dataloader.py`` ``sample_episode_for_training``), and its *last* listed class at
evaluation (``val_pascal_dataloader.py`` ``get_top50_images_trn`` overwrites per line);
``first`` = always the first listed class. With ``class_matched`` only pool images listing the
query's class are candidates, and that class's label is shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PAIR_CHOICES = ("none", "random", "retrieved", "random_same_class")
SUPPORT_CLASS_CHOICES = ("official", "first")
TIMM_PREFIX = "timm:"


# ------------------------------------------------------------------ pool images (deduplicated)
def pool_images(pool_ids: list[str], pool_classes: list[int]) -> tuple[list[str], list[list[int]], dict]:
    """Unique pool image ids (first-appearance order), each image's listed classes in list order,
    and ``(id, class) -> first pool line index``."""
    order: list[str] = []
    classes: dict[str, list[int]] = {}
    line: dict[tuple[str, int], int] = {}
    for j, (iid, c) in enumerate(zip(pool_ids, pool_classes)):
        if iid not in classes:
            order.append(iid)
            classes[iid] = []
        if c not in classes[iid]:
            classes[iid].append(c)
        line.setdefault((iid, c), j)
    return order, [classes[i] for i in order], line


def support_class_for(listed: list[int], query_class: int, training: bool, rule: str) -> int:
    if rule == "first":
        return listed[0]
    if training:
        return query_class if query_class in listed else listed[0]
    return listed[-1]


def select_pairs(strategy: str, query_ids: list[str], query_classes: list[int], pool_ids: list[str],
                 pool_classes: list[int], class_matched: bool, seed: int, *, sims: torch.Tensor | None = None,
                 training: bool = False, support_class: str = "official") -> list[int]:
    """Index into the pool *lines* of the in-context pair for each query.

    ``sims``: [n_queries, n_unique_pool_images] similarities (``retrieved`` only), the unique
    images in :func:`pool_images` order.
    """
    if strategy not in ("random", "retrieved"):
        raise ValueError(f"unknown in-context pair strategy {strategy!r}; valid: random, retrieved")
    if support_class not in SUPPORT_CLASS_CHOICES:
        raise ValueError(f"unknown support_class rule {support_class!r}; valid: {', '.join(SUPPORT_CLASS_CHOICES)}")
    if not pool_ids:
        raise ValueError("the in-context pool (train split) is empty")
    ids, listed, line = pool_images(pool_ids, pool_classes)
    n = len(ids)
    if strategy == "retrieved":
        if sims is None or tuple(sims.shape) != (len(query_ids), n):
            raise ValueError(f"retrieved pairs need a [{len(query_ids)}, {n}] similarity matrix, got "
                             f"{None if sims is None else list(sims.shape)}")
    names = np.array(ids)
    rng = np.random.default_rng(seed)
    out = []
    for i, (qid, qc) in enumerate(zip(query_ids, query_classes)):
        ok = torch.from_numpy(names != qid)
        matched = False
        if class_matched:
            same = ok & torch.tensor([qc in ls for ls in listed])
            if bool(same.any()):
                ok, matched = same, True
        if not bool(ok.any()):
            ok = torch.ones(n, dtype=torch.bool)
        if strategy == "retrieved":
            s = sims[i].clone().float()
            s[~ok] = -float("inf")
            k = int(s.argmax())
        else:
            cand = torch.nonzero(ok).flatten().numpy()
            k = int(cand[rng.integers(len(cand))])
        c = qc if matched else support_class_for(listed[k], qc, training, support_class)
        out.append(line[(ids[k], c)])
    return out


def random_same_class_pairs(names: list[str], classes: list[int], n_episodes: int, seed: int) -> list[int]:
    """Bar et al.'s episodes: for episode ``e`` (query ``e % len``), a random line of the same list
    with the query's class and another image name, drawn as ``evaluate/pascal_dataloader.py``
    ``sample_episode`` does (``np.random.choice(classwise[c], 1, replace=False)`` until it differs
    from the query). Returns one line index per episode (the first line of the drawn name and class)."""
    rs = np.random.RandomState(seed)
    by_class: dict[int, list[str]] = {}
    first_line: dict[tuple[str, int], int] = {}
    for j, (nm, c) in enumerate(zip(names, classes)):
        by_class.setdefault(c, []).append(nm)
        first_line.setdefault((nm, c), j)
    out = []
    for e in range(n_episodes):
        q = e % len(names)
        qn, qc = names[q], classes[q]
        options = by_class[qc]
        if all(o == qn for o in options):
            from prompttune.data.base import DataError

            raise DataError(f"data.pair=random_same_class: class {qc} has no image other than {qn!r} in this list")
        while True:
            pick = rs.choice(options, 1, replace=False)[0]
            if pick != qn:
                break
        out.append(first_line[(str(pick), qc)])
    return out


# ------------------------------------------------------------------ retrievers and similarities
class TimmTokenRetriever:
    """The official retriever: a timm model's ``forward_features`` tokens, flattened.

    ``weights``: ``pretrained`` (timm's own download, e.g. ``timm/vit_large_patch14_clip_224.laion2b``),
    ``random``, or a local weights file (``.safetensors``/``.bin``/``.pth``, loaded by timm through
    ``pretrained_cfg_overlay``).
    """

    def __init__(self, model_name: str, weights: str | None = "pretrained", device: str | torch.device = "cpu"):
        import timm

        self.name = model_name
        kw: dict[str, Any] = {}
        if weights and weights not in ("pretrained", "random"):
            if not Path(weights).is_file():
                raise FileNotFoundError(f"retriever weights not found: {weights} (data.retriever_weights)")
            kw["pretrained_cfg_overlay"] = {"file": str(weights)}
        try:
            self.model = timm.create_model(model_name, pretrained=weights != "random", **kw)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"data.retriever {TIMM_PREFIX}{model_name}: timm has no such model") from None
            raise
        self.model.eval().requires_grad_(False).to(device)
        cfg = self.model.pretrained_cfg
        self.size = int(cfg["input_size"][-1])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.device = torch.device(device)

    def transform(self, img) -> torch.Tensor:
        """torchvision ``Resize(size, BICUBIC)`` (shorter side; long side truncated) + ``CenterCrop``
        (offsets rounded) + ``ToTensor`` + ``Normalize``, written out in PIL/numpy."""
        from PIL import Image

        s = self.size
        w, h = img.size
        if w <= h:
            nw, nh = s, int(s * h / w)
        else:
            nw, nh = int(s * w / h), s
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x.to(self.device)).flatten(1).float()


class PooledRetriever:
    """A project backbone's pooled ``encode_image`` (configs/backbone/<name>.yaml)."""

    def __init__(self, name: str, weights: str | None = None):
        from omegaconf import OmegaConf

        from prompttune.config import load_group
        from prompttune.data.base import ImageTransform
        from prompttune.registry import BACKBONES

        cfg = OmegaConf.to_container(OmegaConf.create(load_group("backbone", name)), resolve=True)
        if weights:
            cfg["weights"] = weights
        cls = BACKBONES.get(cfg.pop("name"))
        self.backbone = cls(**cfg)
        if not hasattr(self.backbone, "encode_image"):
            raise ValueError(f"retriever backbone {name!r} ({type(self.backbone).__name__}) has no encode_image")
        self.name = getattr(self.backbone, "name", name)
        self.tf = ImageTransform(int(getattr(self.backbone, "image_size", 224)), self.backbone.mean, self.backbone.std)

    def transform(self, img) -> torch.Tensor:
        return self.tf(img)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(x.to(self.backbone.device)).float()


def build_retriever(spec: str, weights: str | None = None):
    """``timm:<name>`` -> :class:`TimmTokenRetriever`; otherwise a backbone config name."""
    if spec.startswith(TIMM_PREFIX):
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        return TimmTokenRetriever(spec[len(TIMM_PREFIX):], weights or "pretrained", dev)
    return PooledRetriever(spec, weights)


@torch.no_grad()
def normalised_features(retriever, paths: list[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised (flattened) features, one row per path, kept on the retriever's device."""
    from prompttune.data.base import read_image

    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([retriever.transform(read_image(p)) for p in paths[i:i + batch_size]])
        out.append(F.normalize(retriever.features(x), dim=-1))
    return torch.cat(out)


def similarity(retriever, retriever_key: str, query_paths: list[str], pool_paths: list[str]) -> torch.Tensor:
    """[n_query, n_pool] cosine similarities, cached on disk per (retriever, image lists).

    Only the similarity matrix is stored (token features of ViT-L/14 are ~1 MB per image), in the
    frozen-feature store (prompttune.features): keyed by the retriever's weights fingerprint (so
    two random or two different local weights never share an entry), its input transform and
    both image lists; written atomically, one writer per key across processes."""
    from prompttune import features

    model = getattr(retriever, "model", None) or getattr(retriever, "backbone", None)
    tf = getattr(retriever, "tf", None)
    key = {"format": features.FORMAT, "kind": "icl-sims", "retriever": retriever_key,
           "name": getattr(retriever, "name", ""),
           "weights": features.weights_fingerprint(model) if model is not None else None,
           "transform": features.transform_key(tf) if tf is not None else
           {k: features._plain(getattr(retriever, k, None)) for k in ("size", "mean", "std")},
           "images": features.paths_key(query_paths), "pool": features.paths_key(pool_paths)}

    def compute():
        pool = normalised_features(retriever, pool_paths)
        rows = []
        for i in range(0, len(query_paths), 256):
            q = normalised_features(retriever, query_paths[i:i + 256])
            rows.append((q @ pool.T).cpu())
        sims = torch.cat(rows) if rows else torch.zeros(0, len(pool_paths))
        return sims, torch.ones(len(query_paths), dtype=torch.bool)

    if not query_paths:
        return torch.zeros(0, len(pool_paths))
    sims, _ = features.FeatureStore().get_or_compute(key, compute)
    return sims
