"""Competence probes measured at zoo build time (the numbers a ZooEntry's bars check).

A linear probe here is a closed-form ridge classifier on frozen, standardised features: no
optimiser, no learning rate, deterministic, and a lower bound on what a trained probe reaches.
The probe's data is the synthetic world's 16 fine-grained classes, drawn with seeds that no
zoo pretraining or demo split uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

PROBE_SEED = 7321  # no pretraining set or demo split uses it


def probe_images(side: int, mean, std, n_train: int = 24, n_test: int = 24) -> dict[str, torch.Tensor]:
    """Train/test images [N, 3, side, side] (normalised) and labels of the 16 fine-grained classes."""
    from prompttune.config import cache_dir
    from prompttune.data.base import ImageTransform, read_image
    from prompttune.data.image_folder import ensure_synthetic, read_split_file

    root = cache_dir() / "data" / f"world-probe-{n_train}-{n_test}-{side}-s{PROBE_SEED}"
    ensure_synthetic({"kind": "classification", "n_train": n_train, "n_val": 0, "n_test": n_test, "side": side,
                      "seed": PROBE_SEED, "background": "noise"}, root)
    split = read_split_file(root / "split_prompttune_world.json")
    tf = ImageTransform(side, tuple(mean), tuple(std))
    out = {}
    for s in ("train", "test"):
        rows = split[s]
        out[f"{s}_x"] = torch.stack([tf(read_image(root / "images" / r[0])) for r in rows])
        out[f"{s}_y"] = torch.tensor([int(r[1]) for r in rows])
    return out


@torch.no_grad()
def ridge_probe_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                         ridge: float = 1.0) -> float:
    """Top-1 test accuracy of a one-vs-rest ridge classifier fitted in closed form."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp(min=1e-6)
    x, xt = (train_f - mu) / sd, (test_f - mu) / sd
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    xt = torch.cat([xt, torch.ones(len(xt), 1)], 1).double()
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    y = torch.nn.functional.one_hot(train_y, n_cls).double() * 2 - 1
    w = torch.linalg.solve(x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    return float(((xt @ w).argmax(1) == test_y).float().mean())


@torch.no_grad()
def linear_probe(encode: Callable[[torch.Tensor], torch.Tensor], side: int, mean, std,
                 batch: int = 256) -> dict[str, float]:
    """Ridge-probe accuracy of ``encode`` (images -> [N, D]) on the fine-grained classes, and chance."""
    data = probe_images(side, mean, std)

    def feats(x):
        return torch.cat([encode(x[i:i + batch]).float() for i in range(0, len(x), batch)])

    acc = ridge_probe_accuracy(feats(data["train_x"]), data["train_y"], feats(data["test_x"]), data["test_y"])
    n_cls = int(data["train_y"].max()) + 1
    return {"linear_probe_acc": round(acc, 4), "chance": round(1.0 / n_cls, 4)}


def folder_name(folder: Path) -> str:
    return Path(folder).parent.name
