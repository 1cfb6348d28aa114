"""The offline zoo: small backbones of the real architectures, pretrained by prompttune itself
on the synthetic world, cached in the user cache and rebuilt deterministically if missing.

An entry registers where its architecture is defined (``ZOO.register``) with a function
that builds the untrained model and one that pretrains it. ``ensure(name)`` returns the
path of its weights (safetensors), building them under a file lock if needed, so that
parallel processes (DDP ranks, sweeps) never build twice or read half a file.
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prompttune.config import cache_dir
from prompttune.registry import ZOO
from prompttune.utils import atomic_write_json


@dataclass
class ZooEntry:
    name: str
    backbone: str  # registry name of the wrapper that loads it
    description: str
    make_model: Callable[[], nn.Module]  # the architecture, randomly initialised
    pretrain: Callable[[nn.Module, Path], dict[str, Any]]  # trains in place; returns a summary
    version: str = "1"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return cache_dir() / "zoo" / self.name / f"v{self.version}"

    @property
    def weights(self) -> Path:
        return self.folder / "weights.safetensors"

    @property
    def meta(self) -> Path:
        return self.folder / "meta.json"

    def built(self) -> bool:
        return self.weights.is_file() and self.meta.is_file()


def register(entry: ZooEntry) -> ZooEntry:
    return ZOO.register(entry.name)(entry)


def get(name: str) -> ZooEntry:
    return ZOO.get(name)


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(name: str, force: bool = False) -> Path:
    entry = get(name)
    with _lock(entry.folder.parent / ".lock"):
        if entry.built() and not force:
            return entry.weights
        from safetensors.torch import save_model

        torch.manual_seed(0)
        model = entry.make_model()
        t0 = time.perf_counter()
        summary = entry.pretrain(model, entry.folder)
        entry.folder.mkdir(parents=True, exist_ok=True)
        tmp = entry.weights.with_suffix(".tmp")
        save_model(model.cpu(), str(tmp))  # handles tied weights (e.g. an LM's embeddings and head)
        tmp.replace(entry.weights)
        atomic_write_json(entry.meta, {"name": name, "version": entry.version, "backbone": entry.backbone,
                                       "build_time_s": round(time.perf_counter() - t0, 1), **summary})
        return entry.weights


def ensure(name: str) -> Path:
    entry = get(name)
    return entry.weights if entry.built() else build(name)


def load_model(name: str, weights: str = "pretrained") -> nn.Module:
    """The zoo model: pretrained (built on first use) or, with ``weights="random"``, untrained."""
    entry = get(name)
    torch.manual_seed(0)
    model = entry.make_model()
    if weights == "random":
        return model
    if weights != "pretrained":
        raise ValueError(f"zoo weights must be 'pretrained' or 'random', not {weights!r}")
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(ensure(name)), strict=False)  # re-ties shared weights
    if missing or unexpected:
        raise RuntimeError(f"zoo entry {name!r}: weights do not match its architecture "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); rebuild with "
                           f"`prompttune zoo build {name} --force`")
    return model


def describe() -> list[dict[str, Any]]:
    rows = []
    for name in ZOO.names():
        e = get(name)
        meta = json.loads(e.meta.read_text()) if e.meta.is_file() else {}
        rows.append({"name": name, "backbone": e.backbone, "built": e.built(), "description": e.description,
                     "path": str(e.weights), **{k: v for k, v in meta.items() if k not in ("name", "backbone")}})
    return rows
