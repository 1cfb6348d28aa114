"""The frozen-feature store: each frozen feature of a sweep is computed once.

A frozen backbone with a deterministic transform maps the same image list to the same
features in every run of a sweep (every seed, shot count and method setting that reads
frozen features: zero-shot, linear probe, CoOp's image side, the cacheable retrieval
variants). The store keeps them on disk, keyed by

* the **weights**: :func:`weights_fingerprint`, a sha1 of the module's architecture
  (``repr``: QuickGELU vs GELU, pooling, ...) and of every state-dict tensor's name, dtype,
  shape and bytes (computed once per module object; ~0.4 s per 100 M fp32 parameters here);
* the **transform**: :func:`transform_key`, its parameters (size, resize ratio, crop,
  interpolation, mean, std); a transform that randomises (``augment``) or that cannot be
  described (a lambda) has no key and is never stored;
* the **image list**: :func:`image_list_key`, every item's path, size and mtime (a replaced
  file misses), in dataset order (row ``i`` is dataset index ``i``);
* the **encoder** and the numerics it ran under (hook name, autocast dtype, store format).

Each entry is one safetensors file ``cache_dir()/features/<sha256>.safetensors`` with
``features`` ``[N, D]`` float32 and ``filled`` ``[N]`` bool (a row the dataset never
yields, e.g. an unreadable image under ``on_corrupt: skip``, stays unfilled), and the key
in its metadata. It is written to a temporary file and ``os.replace``-d into place, under
a ``filelock`` lock per key: of several processes asking for the same key at once (the
``--jobs`` of a sweep, DDP ranks, a SLURM array on a shared file system), one computes
and writes, the others wait and read. A file that does not load, or whose key or shape
disagrees, is renamed ``*.corrupt-<time>`` (kept for inspection) and recomputed.

Where: ``cache_dir()/features`` (``$PROMPTTUNE_HOME/features``), or ``$PROMPTTUNE_FEATURE_STORE``.
Switch: ``features.store: false`` (config) turns the store off; the in-memory
:class:`~prompttune.module.FeatureCache` of a run still works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("prompttune")

FORMAT = "prompttune-features-1"
_FINGERPRINT_ATTR = "_prompttune_weights_fingerprint"


# --------------------------------------------------------------------------- key parts
def weights_fingerprint(module: nn.Module) -> str:
    """sha1 of ``module``'s architecture and state-dict bytes; memoised on the module.

    The memo is valid because a frozen backbone never changes; a module whose parameters
    require grad (something trains it) is hashed afresh every call."""
    memo = getattr(module, _FINGERPRINT_ATTR, None)
    if memo is not None:
        return memo
    h = hashlib.sha1()
    h.update(type(module).__qualname__.encode())
    h.update(repr(module).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    digest = h.hexdigest()
    if not any(p.requires_grad for p in module.parameters()):
        object.__setattr__(module, _FINGERPRINT_ATTR, digest)  # not a submodule/buffer: plain attribute
    return digest


def _plain(value: Any) -> Any:
    """A JSON-able description of a transform attribute, or raise TypeError."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return [round(float(v), 8) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def transform_key(transform: Any) -> dict[str, Any] | None:
    """The transform's parameters, or ``None`` when features through it may not be stored:
    it randomises (``augment``) or cannot be described (no attributes, a lambda)."""
    if transform is None or getattr(transform, "augment", False):
        return None
    attrs = getattr(transform, "__dict__", None)
    if not attrs:
        return None
    out: dict[str, Any] = {"class": f"{type(transform).__module__}.{type(transform).__qualname__}"}
    for k, v in sorted(attrs.items()):
        if k in ("rng", "generator") or k.startswith("_"):
            continue  # random state: unused when augment is off
        try:
            out[k] = _plain(v)
        except TypeError:
            return None  # something we cannot describe (a callable, a model): never store
    return out


def image_list_key(dataset: Any) -> str | None:
    """sha256 over the dataset's image paths, sizes and mtimes, in order; ``None`` when the
    dataset is not a list of image files (``items`` with ``path``)."""
    items = getattr(dataset, "items", None)
    if not isinstance(items, (list, tuple)) or not items:
        return None
    paths = [it.get("path") if isinstance(it, dict) else None for it in items]
    return None if any(p is None for p in paths) else paths_key(paths)


def paths_key(paths: list[str]) -> str:
    """``"<n>:<sha256>"`` over each file's path, size and mtime, in order (a missing file keys as such)."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            h.update(f"{path}|missing\n".encode())  # the dataset reports it when it reads the row
            continue
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{len(paths)}:{h.hexdigest()}"


def feature_key(backbone: nn.Module, dataset: Any, encoder: str = "encode_image",
                autocast_dtype: torch.dtype | None = None) -> dict[str, Any] | None:
    """The full key of ``dataset``'s features through ``backbone.<encoder>``, or ``None`` if
    they may not be stored (see :func:`transform_key`, :func:`image_list_key`)."""
    if getattr(dataset, "augment", False):
        return None
    tkey = transform_key(getattr(dataset, "transform", None))
    images = image_list_key(dataset)
    if tkey is None or images is None:
        return None
    return {"format": FORMAT, "weights": weights_fingerprint(backbone), "backbone": type(backbone).__qualname__,
            "encoder": encoder, "autocast": str(autocast_dtype) if autocast_dtype is not None else None,
            "transform": tkey, "images": images}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the store
class FeatureStore:
    """``get_or_compute(key, compute)`` -> ``(features [N, D] float32, filled [N] bool)`` on the CPU."""

    def __init__(self, root: str | Path | None = None, lock_timeout: float = -1):
        if root is None and os.environ.get("PROMPTTUNE_FEATURE_STORE"):
            root = os.environ["PROMPTTUNE_FEATURE_STORE"]  # another store: a shared disk, or a cold one to measure
        if root is None:
            from prompttune.config import cache_dir

            root = cache_dir() / "features"
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self.hits = self.misses = 0

    def path_for(self, key: dict[str, Any]) -> Path:
        return self.root / f"{key_digest(key)}.safetensors"

    def _load(self, path: Path, key: dict[str, Any]):
        """The entry at ``path``, ``None`` if absent; a bad file is set aside and ``None`` returned."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT or json.loads(meta.get("key", "null")) != key:
                    raise ValueError("its key differs from the file name's")
                feats, filled = fh.get_tensor("features"), fh.get_tensor("filled")
            n = int(key["images"].split(":", 1)[0])
            if feats.dim() != 2 or feats.shape[0] != n or tuple(filled.shape) != (n,) or filled.dtype != torch.bool:
                raise ValueError(f"shapes {tuple(feats.shape)}/{tuple(filled.shape)} for {n} images")
            if not torch.isfinite(feats[filled]).all():
                raise ValueError("non-finite features")
            return feats, filled
        except Exception as err:  # truncated, foreign or tampered: keep it for inspection, recompute
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            try:
                os.replace(path, aside)
            except OSError:
                pass
            log.warning("feature store: %s is unreadable (%s: %s); set aside as %s, recomputing",
                        path.name, type(err).__name__, err, aside.name)
            return None

    def _save(self, path: Path, key: dict[str, Any], feats: torch.Tensor, filled: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"features": feats.detach().float().cpu().contiguous(),
                       "filled": filled.detach().bool().cpu().contiguous()}, tmp,
                      metadata={"format": FORMAT, "key": json.dumps(key, sort_keys=True)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def lock(self, key: dict[str, Any]):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path_for(key)) + ".lock", timeout=self.lock_timeout)

    def get(self, key: dict[str, Any]):
        """The stored entry or ``None`` (no lock: the file is replaced atomically)."""
        return self._load(self.path_for(key), key)

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        path = self.path_for(key)
        hit = self._load(path, key)  # the common case in a sweep: no lock taken at all
        if hit is not None:
            self.hits += 1
            return hit
        with self.lock(key):
            hit = self._load(path, key)  # another process may have written it while we waited
            if hit is not None:
                self.hits += 1
                return hit
            feats, filled = compute()
            feats, filled = feats.detach().float().cpu(), filled.detach().bool().cpu()
            self._save(path, key, feats, filled)
            self.misses += 1
            return feats, filled


# --------------------------------------------------------------------------- computing an entry
@torch.no_grad()
def encode_dataset(encode: Callable[[torch.Tensor], torch.Tensor], dataset, device: torch.device,
                   batch_size: int = 256, num_workers: int = 0, collate_fn=None, context=None):
    """``(features [N, D], filled [N])`` of every row ``dataset`` yields, in one ordered pass.

    Rows are placed by the ``index`` each item carries (a dataset that substitutes an
    unreadable image reports the substitute's index, so the skipped row stays unfilled)."""
    from torch.utils.data import DataLoader

    n = len(dataset)
    feats = filled = None
    restore = getattr(dataset, "load_images", None)
    if restore is not None:
        dataset.load_images = True
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate_fn)
        for batch in loader:
            with context() if context is not None else nullcontext():
                f = encode(batch["image"].to(device, non_blocking=True)).float()
            if feats is None:
                feats = torch.zeros(n, f.shape[1], dtype=torch.float32, device=f.device)
                filled = torch.zeros(n, dtype=torch.bool, device=f.device)
            idx = batch["index"].to(f.device)
            feats[idx] = f
            filled[idx] = True
    finally:
        if restore is not None:
            dataset.load_images = restore
    if feats is None:
        raise ValueError("the dataset yielded no rows to encode")
    return feats, filled
