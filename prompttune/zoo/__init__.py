"""The offline zoo: small backbones of the real architectures, pretrained by prompttune itself
on the synthetic world, cached in the user cache and rebuilt deterministically when missing.

One file per entry in this package (``clip_tiny.py``, ``vit_mae_tiny.py``, ...). Each registers
a :class:`ZooEntry`: a function that builds the untrained architecture, one that pretrains it
and returns a summary, and the *competence bars* the summary must clear. A zoo model that is
not competent at the job its papers need makes every verdict of the demo an artefact of the
zoo, so a build that misses a bar fails loudly and writes nothing (``docs/zoo.md``).

Guarantees:

* ``ensure(name)`` builds under a file lock, so parallel processes (DDP ranks, sweeps) never
  build twice or read half a file; weights and meta are written atomically, mode 0644.
* A corrupt or stale build (truncated safetensors, unreadable meta, meta of another version or
  format) is set aside to ``<folder>.bad-<time>`` and rebuilt, with a warning saying so.
* Builds are deterministic whatever the caller's thread count: they run with one intra-op
  thread and a fixed seed (:func:`deterministic`); meta records the weights' sha256.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from prompttune.config import cache_dir
from prompttune.registry import ZOO
from prompttune.utils import atomic_write_json

log = logging.getLogger("prompttune")

# Bumped when the layout of a build folder (files, meta keys) changes: every older build is stale.
FORMAT = 2


class ZooBuildError(RuntimeError):
    """A zoo build missed a competence bar, or its files cannot be written."""


@dataclass(frozen=True)
class Bar:
    """A competence bar: ``summary[key]`` must be >= ``min`` (or <= ``max``), measured at build time."""

    key: str
    min: float | None = None
    max: float | None = None
    why: str = ""

    def check(self, summary: dict[str, Any]) -> str | None:
        """None when met, else what was measured against what was needed."""
        if self.key not in summary:
            return f"{self.key}: not measured by the build"
        v = float(summary[self.key])
        if self.min is not None and not v >= self.min:
            return f"{self.key} = {v:.4g}, needs >= {self.min:g} ({self.why})"
        if self.max is not None and not v <= self.max:
            return f"{self.key} = {v:.4g}, needs <= {self.max:g} ({self.why})"
        return None

    def describe(self) -> str:
        bound = f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"
        return f"{self.key} {bound}"


@dataclass
class ZooEntry:
    name: str
    backbone: str  # registry name of the wrapper that loads it
    description: str
    make_model: Callable[[], nn.Module]  # the architecture, randomly initialised
    pretrain: Callable[[nn.Module, Path], dict[str, Any]]  # trains in place; returns a summary (bars' keys)
    version: str = "1"
    bars: tuple[Bar, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)  # what a wrapper needs to load it (e.g. mean, std)
    # entries this one is built from (e.g. vit-clip-tiny from clip-tiny): built first; their sha256 at
    # build time is recorded in meta.json, and a rebuilt source makes this build stale
    needs: tuple[str, ...] = ()

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

    def recipe(self) -> str:
        """A fingerprint of the recipe: the version and the source files of ``make_model`` and
        ``pretrain`` (a build is deterministic, so the same recipe misses the same bars again)."""
        import functools
        import inspect

        h = hashlib.sha1(f"{self.name}:{self.version}:{FORMAT}".encode())
        for fn in (self.make_model, self.pretrain):
            while isinstance(fn, functools.partial):  # its bound arguments are part of the recipe
                h.update(repr((fn.args, sorted(fn.keywords.items()))).encode())
                fn = fn.func
            try:
                h.update(Path(inspect.getsourcefile(fn)).read_bytes())
            except (TypeError, OSError):
                h.update(getattr(fn, "__qualname__", type(fn).__name__).encode())
        return h.hexdigest()

    def problem(self) -> str | None:
        """Why the build on disk cannot be used (None when it can; also None when nothing is built)."""
        if not self.folder.exists():
            return None
        if not self.meta.is_file() and not self.weights.is_file():
            return None
        if not self.meta.is_file():
            return "meta.json is missing"
        if not self.weights.is_file():
            return "weights.safetensors is missing"
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError) as err:
            return f"meta.json is unreadable ({err})"
        if not isinstance(meta, dict):
            return "meta.json holds no object"
        if str(meta.get("version")) != str(self.version) or meta.get("format") != FORMAT:
            return (f"meta.json is of version {meta.get('version')!r} format {meta.get('format')!r}, "
                    f"not version {self.version!r} format {FORMAT}")
        size = self.weights.stat().st_size
        if "bytes" in meta and size != meta["bytes"]:
            return f"weights.safetensors has {size} bytes, meta.json says {meta['bytes']} (truncated?)"
        try:
            from safetensors import safe_open

            with safe_open(str(self.weights), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            return f"weights.safetensors is unreadable ({type(err).__name__}: {err})"
        for src in self.needs:
            sha, now = (meta.get("sources") or {}).get(src), read_meta(src).get("sha256")
            if sha and now and now != sha:
                return f"it was built from {src} {sha[:12]}, whose build is now {now[:12]}"
        return None


def register(entry: ZooEntry) -> ZooEntry:
    return ZOO.register(entry.name)(entry)


def get(name: str) -> ZooEntry:
    return ZOO.get(name)


def names() -> list[str]:
    return ZOO.names()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def deterministic(seed: int = 0) -> Iterator[None]:
    """One intra-op thread and a fixed seed, restored on exit.

    CPU reductions split across threads sum in a thread-count-dependent order, so the same
    build on 1, 2 or 16 threads would give different weights (and a different demo).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _set_aside(entry: ZooEntry, why: str) -> Path:
    dest = entry.folder.with_name(f"{entry.folder.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    entry.folder.rename(dest)
    msg = (f"zoo entry {entry.name!r}: the build in {entry.folder} cannot be used: {why}; "
           f"set aside to {dest} and rebuilt")
    log.warning(msg)
    print(f"warning: {msg}", flush=True)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(name: str, force: bool = False) -> Path:
    """Build ``name`` (pretrain, check its bars, write it); a usable build is kept unless ``force``."""
    entry = get(name)
    with _lock(entry.folder.parent / ".lock"):
        why = "rebuild forced (--force)" if force and entry.folder.exists() else entry.problem()
        failed_file = entry.folder / "failed_bars.json"
        if not force and not why and failed_file.is_file():  # the same recipe would miss the same bars again
            try:
                failed_before = json.loads(failed_file.read_text())
            except (OSError, ValueError):
                failed_before = {}
            if failed_before.get("recipe") == entry.recipe() and failed_before.get("failure"):
                raise ZooBuildError(f"{failed_before['failure']} -- recorded by an earlier build of this same recipe "
                                    f"({failed_file}); change the recipe, or retry with "
                                    f"`prompttune zoo build {name} --force`")
        if why:
            _set_aside(entry, why)
        elif entry.built():
            return entry.weights
        from safetensors.torch import save_model

        print(f"zoo: building {name} (v{entry.version}); this happens once per cache", flush=True)
        entry.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with deterministic(0):
            model = entry.make_model()
            summary = entry.pretrain(model, entry.folder)
        failed = [m for m in (bar.check(summary) for bar in entry.bars) if m]
        if failed:
            failure = f"zoo entry {name!r} missed its competence bar(s): " + "; ".join(failed)
            atomic_write_json(failed_file, {"name": name, "version": entry.version, "recipe": entry.recipe(),
                                            "failure": failure, **summary})
            raise ZooBuildError(failure + f" (summary in {failed_file}; nothing was cached)")
        tmp = entry.weights.with_name(f".weights.{os.getpid()}.tmp")
        save_model(model.cpu(), str(tmp))  # handles tied weights (e.g. an LM's embeddings and head)
        os.chmod(tmp, 0o644)  # shared caches: readable by every user of the machine
        tmp.replace(entry.weights)
        meta = {"name": name, "version": entry.version, "format": FORMAT, "backbone": entry.backbone,
                "build_time_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                "bytes": entry.weights.stat().st_size, "sha256": _sha256(entry.weights),
                "bars": {b.describe(): b.check(summary) is None for b in entry.bars}, **summary}
        if entry.needs:
            meta["sources"] = {n: read_meta(n).get("sha256") for n in entry.needs}
        atomic_write_json(entry.meta, meta)
        os.chmod(entry.meta, 0o644)
        (entry.folder / "failed_bars.json").unlink(missing_ok=True)
        print(f"zoo: built {name} in {meta['build_time_s']} s; bars: "
              + (", ".join(f"{b.key}={summary[b.key]}" for b in entry.bars) or "none"), flush=True)
        return entry.weights


def ensure(name: str) -> Path:
    entry = get(name)
    return entry.weights if entry.built() and entry.problem() is None else build(name)


def load_model(name: str, weights: str = "pretrained") -> nn.Module:
    """The zoo model: pretrained (built on first use) or, with ``weights="random"``, untrained.

    The untrained model is always the same one (seed 0), and building it does not touch the
    caller's random state.
    """
    if weights not in ("pretrained", "random"):
        raise ValueError(f"zoo weights must be 'pretrained' or 'random', not {weights!r}")
    entry = get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = entry.make_model()
    if weights == "random":
        return model
    from safetensors.torch import load_model as st_load

    missing, unexpected = st_load(model, str(ensure(name)), strict=False)  # re-ties shared weights
    if missing or unexpected:
        raise RuntimeError(f"zoo entry {name!r}: weights do not match its architecture "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); rebuild with "
                           f"`prompttune zoo build {name} --force`")
    return model


def read_meta(name: str) -> dict[str, Any]:
    entry = get(name)
    try:
        return json.loads(entry.meta.read_text()) if entry.meta.is_file() else {}
    except (OSError, ValueError):
        return {}


def describe() -> list[dict[str, Any]]:
    rows = []
    for name in names():
        e = get(name)
        meta = read_meta(name)
        rows.append({"name": name, "backbone": e.backbone, "built": e.built() and e.problem() is None,
                     "problem": e.problem(), "description": e.description, "path": str(e.weights),
                     "bar_specs": [b.describe() for b in e.bars],
                     **{k: v for k, v in meta.items() if k not in ("name", "backbone")}})
    return rows
