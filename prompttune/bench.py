"""``prompttune bench``: what the framework costs, against what the hardware allows.

For one method (or ``all``), built exactly as ``prompttune fit experiments/smoke.yaml
method=NAME`` builds it (:func:`prompttune.config.compose` -> :func:`prompttune.runs.build`
-> :func:`prompttune.runs.make_module`), one process measures:

* ``fw_step_ms``: prompttune's training step inside a real ``lightning.Trainer`` (the
  whole loop iteration: batch hand-off, ``training_step``, backward, optimiser and
  scheduler step, logging), timed by a callback between consecutive
  ``on_train_batch_end`` calls;
* ``plain_step_ms``: a minimal plain-PyTorch loop doing the same computation on the same
  batch (method forward + task loss + backward + ``optimizer.step`` + scheduler step, on
  a copy of the method with the same optimiser);
* ``fwd_ms``: the forward-only time (method forward under ``torch.no_grad``, features
  recomputed, never cached) -- the floor a training step is compared with.

The three run **interleaved**, one of each per batch, so that CPU contention from other
processes hits them alike; the first ``warmup`` steps are dropped and medians reported.

* ``overhead_ratio`` = median fw_step / median plain_step (target <= 1.05);
  ``overhead_ratio_paired`` is the median of the per-step ratios (same batch, adjacent in
  time), a cross-check that is insensitive to slow drifts in machine load.
* ``limit_ratio`` = median fw_step / median fwd (input-level prompts: target <= 2.5; a
  step needs a forward plus the backward to the prompts, never the frozen weights' grads).
* ``cache_speedup`` (methods with ``consumes == "image_features"``): epoch-1 time over the
  median later-epoch time through the real Trainer and the real DataLoader, which reads
  the frozen features from :class:`~prompttune.module.FeatureCache` after epoch 1.
* ``peak_mem_mb`` / ``full_ft_peak_mem_mb``: peak memory of training the method, and of
  full fine-tuning of the same backbone (every backbone weight trainable, plain loop,
  same optimiser), each in a fresh subprocess on the CPU (peak RSS is process-wide and
  monotone) or from ``torch.cuda`` peak statistics on a GPU.
* ``tflops`` / ``mfu``: model FLOPs of one training step (``torch.utils.flop_counter``)
  over the step time; MFU against the device's dense bf16 peak (known GPUs, or
  ``bench.peak_tflops=``).

Methods with no trainable parameters (zero-shot, no-prompt) are not trained by ``fit``;
for them the evaluation step (``test_step``) is compared with a plain no-grad forward +
metric update.

Bench-only options go in the ``key=value`` list with a ``bench.`` prefix (they are taken
out before the config is composed): ``bench.warmup=3``, ``bench.compile=true``
(``nn.Module.compile`` on the method, both sides), ``bench.memory=false``,
``bench.cache_epochs=3``, ``bench.cache_batches=0`` (0: whole epochs), ``bench.peak_tflops=989``,
``bench.threads=N`` (``torch.set_num_threads``; 0 keeps PyTorch's default) and
``bench.clock=auto|cpu|wall``. On the CPU the ratios use process CPU time by default
(``auto``): on a shared machine, wall time mostly measures the other processes, while CPU
time is what this process spent; ``wall_step_ms`` and ``samples_per_s`` stay wall-clock.
On CUDA the clock is wall time with ``torch.cuda.synchronize`` around each measurement. ``trainer=gpu`` runs on CUDA in
bf16-mixed (the plain loop under the same ``torch.autocast``) with PyTorch's fused
scaled-dot-product attention kernels allowed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from prompttune.config import ConfigError

log = logging.getLogger("prompttune")

SMOKE = "experiments/smoke.yaml"
REQUIRED_KEYS = ("method", "overhead_ratio", "limit_ratio", "samples_per_s", "peak_mem_mb")
_BENCH_OPTS = {"warmup": 3, "compile": False, "memory": True, "cache_epochs": 3, "peak_tflops": None,
               "experiment": None, "clock": "auto", "threads": 0,
               "cache_batches": 0, "symmetric": True}

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                   "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
                   "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


class BenchError(ConfigError):
    """Bad bench input (unknown option, bad value), raised before any compute."""


# --------------------------------------------------------------------------- options
def split_options(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Take the ``bench.*`` keys out of ``overrides``; the rest go to the config."""
    opts, rest = dict(_BENCH_OPTS), []
    for item in overrides or []:
        if not item.startswith("bench."):
            rest.append(item)
            continue
        key, sep, value = item[len("bench."):].partition("=")
        if not sep or key not in _BENCH_OPTS:
            raise BenchError(f"unknown bench option {item!r}; valid: "
                             + ", ".join(f"bench.{k}=..." for k in _BENCH_OPTS))
        if key in ("compile", "memory", "symmetric"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise BenchError(f"bench.{key} must be true or false, got {value!r}")
            opts[key] = value.lower() in ("true", "1")
        elif key == "experiment":
            opts[key] = value
        elif key == "clock":
            if value not in ("auto", "cpu", "wall"):
                raise BenchError(f"bench.clock must be auto, cpu or wall, got {value!r}")
            opts[key] = value
        else:
            try:
                opts[key] = float(value) if key == "peak_tflops" else int(value)
            except ValueError:
                raise BenchError(f"bench.{key} must be a number, got {value!r}") from None
            if opts[key] < (1 if key == "cache_epochs" else 0):
                raise BenchError(f"bench.{key} must be >= {1 if key == 'cache_epochs' else 0}, got {value!r}")
    if opts["cache_epochs"] < 2:
        raise BenchError("bench.cache_epochs must be >= 2 (epoch 1 fills the cache, later ones read it)")
    return opts, rest


def compose_for(method: str, overrides: list[str], experiment: str | None = None):
    """The config ``prompttune fit experiments/smoke.yaml method=METHOD ...`` would use."""
    from prompttune.config import compose, repo_root

    exp = experiment or str(repo_root() / SMOKE)
    return compose(exp, [f"method={method}", "backbone.weights=random", *overrides])


# --------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device) -> float:
    _sync(device)
    return time.perf_counter()


def to_device(batch: Any, device) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: dict[str, Any]) -> int:
    import torch

    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
        if isinstance(v, (list, tuple)):
            return len(v)
    return 1


def take_batches(loader, n: int) -> list[dict[str, Any]]:
    """``n`` full-size batches from ``loader``, cycling through it if it is shorter (a short
    last batch is skipped: every timed step has the same size, and a compiled model is
    not recompiled for it)."""
    out: list = []
    full = None
    while len(out) < n:
        before = len(out)
        for b in loader:
            size = batch_size_of(b)
            full = size if full is None else full
            if size != full:
                continue
            out.append(b)
            if len(out) == n:
                break
        if len(out) == before:
            raise BenchError("the training data loader yields no batches")
    return out


class Batches:
    """Pre-collated batches as one iterable (Lightning would read a bare list as a
    collection of loaders); both loops iterate the same tensors, so data loading is in
    neither measurement."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def rss_mb() -> float:
    """Current resident set size of this process (Linux), else 0."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class RSSSampler:
    """Peak resident memory of a block of CPU work, with what was resident before it as the base.

    ``ru_maxrss`` is process-wide and monotone (a transient peak while building the model
    hides everything after it), so instead: release the allocator's free pages
    (``malloc_trim``), read the RSS as the base, then poll the current RSS every
    ``interval`` seconds from a thread while the block runs (PyTorch ops release the GIL)."""

    def __init__(self, interval: float = 0.0005):
        self.interval, self.base, self.peak = interval, 0.0, 0.0

    def __enter__(self):
        import ctypes
        import gc
        import threading

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_mb())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, rss_mb())
        self._stop.set()
        self._thread.join()
        return False


def peak_mb(device) -> float:
    from prompttune.utils import peak_memory_mb

    return peak_memory_mb(device)


@contextmanager
def fused_attention(device):
    """On CUDA, allow only the fused SDPA kernels (flash, memory-efficient, cuDNN) with the
    math kernel as the fall-back for shapes they do not take; a no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.insert(2, SDPBackend.CUDNN_ATTENTION)
    with sdpa_kernel(backends):
        yield


def autocast_for(precision: str, device):
    import torch

    if str(precision).startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if str(precision).startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def make_optimizer(method, optim_cfg: dict[str, Any], total_steps: int):
    """The optimiser and per-step schedule PromptTuningModule.configure_optimizers makes,
    written out plainly (same groups, same hyper-parameters, same schedule)."""
    import torch

    from prompttune.module import lr_lambda

    cfg = dict(optim_cfg)
    params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        return None, None
    groups = method.param_groups(cfg) or [{"params": params}]
    name = str(cfg.get("name", "adamw")).lower()
    lr, wd = float(cfg.get("lr", 1e-3)), float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    epochs = max(int(cfg.get("epochs", 1)), 1)
    warmup = int(round(float(cfg.get("warmup_epochs", 0)) * total_steps / epochs))
    min_ratio = float(cfg.get("min_lr", 0.0)) / lr if lr > 0 else 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(str(cfg.get("scheduler", "cosine")), total_steps,
                                                              warmup, min_ratio))
    return opt, sched


class _SimpleCache:
    """The plain loop's frozen-feature cache: one row per dataset index (what a careful
    hand-written loop would keep; mirrors what the module does so both compute alike)."""

    def __init__(self):
        self.feats = None
        self.filled = None

    def get(self, index, compute):
        import torch

        size = int(index.max()) + 1
        if self.filled is not None and self.filled.numel() >= size and bool(self.filled[index].all()):
            return self.feats[index]
        new = compute()
        if self.feats is None or self.feats.shape[0] < size:
            grow = max(size, 2 * (0 if self.feats is None else self.feats.shape[0]))
            f2 = new.new_zeros((grow, new.shape[1]))
            m2 = torch.zeros(grow, dtype=torch.bool, device=new.device)
            if self.feats is not None:
                f2[: self.feats.shape[0]] = self.feats
                m2[: self.filled.shape[0]] = self.filled
            self.feats, self.filled = f2, m2
        self.feats[index] = new.to(self.feats.dtype)
        self.filled[index] = True
        return new


class _PlainShim:
    """What a manual-optimisation method's ``manual_step`` reads from its module, without
    Lightning: the optimiser config, epoch counters, feature preparation, a no-op log."""

    def __init__(self, plain: "PlainLoop"):
        from types import SimpleNamespace

        self._plain = plain
        self.optim_cfg = plain.optim_cfg
        self.trainer = SimpleNamespace(max_epochs=int(plain.optim_cfg.get("epochs", 1)))
        self.current_epoch = 0
        self.global_step = 0
        self.backbone = plain.backbone
        self.method = plain.method
        self.task = plain.task
        self.device = plain.device

    def log(self, *args, **kwargs) -> None:
        pass

    def prepare_batch(self, batch, stage):
        return self._plain.prepare(batch)

    def manual_backward(self, loss) -> None:
        loss.backward()


class PlainLoop:
    """The minimal hand-written loop: forward, task loss, backward, optimiser step."""

    def __init__(self, backbone, method, task, optim_cfg: dict[str, Any], total_steps: int,
                 device, precision: str = "32-true", cache: bool = True, full_ft: bool = False):
        self.backbone, self.method, self.task = backbone, method, task
        self.optim_cfg, self.device, self.precision = dict(optim_cfg), device, precision
        self.full_ft = full_ft
        self.cache = _SimpleCache() if cache and method.consumes == "image_features" and not full_ft else None
        if full_ft:  # every backbone weight trains too, with the same optimiser settings
            backbone.requires_grad_(True)
            holder = _Joint(method, backbone)
            self.opt, self.sched = make_optimizer(holder, optim_cfg, total_steps)
        else:
            self.opt, self.sched = make_optimizer(method, optim_cfg, total_steps)
        self.shim = _PlainShim(self) if method.manual_optimization else None
        # forward-only runs on its own copy: a method may keep state that its training
        # forward advances (step counters, running statistics); the timed plain step must
        # see exactly the framework's sequence of calls
        try:
            self.fwd_method = copy.deepcopy(method)
        except Exception:
            self.fwd_method = method

    def features(self, batch):
        import torch

        if self.full_ft:
            return self.backbone.encode_image(batch["image"]).float()
        with torch.no_grad():
            return self.backbone.encode_image(batch["image"]).float()

    def prepare(self, batch, use_cache: bool = True):
        if self.method.consumes != "image_features":
            return batch
        batch = dict(batch)
        if use_cache and self.cache is not None and "index" in batch:
            batch["features"] = self.cache.get(batch["index"], lambda: self.features(batch))
        else:
            batch["features"] = self.features(batch)
        return batch

    def loss(self, batch):
        with autocast_for(self.precision, self.device):
            return self.task.loss(self.method(self.backbone, self.prepare(batch)), batch)

    def step(self, batch, batch_idx: int = 0):
        if self.shim is not None:
            self.method.train()
            with autocast_for(self.precision, self.device):
                return self.method.manual_step(self.shim, self.prepare(batch), batch_idx)
        if self.opt is None:
            return self.eval_step(batch)
        self.method.train()  # as Lightning sets it for the training loop
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        if not loss.requires_grad:
            raise BenchError(f"{type(self.method).__name__}'s loss has no gradient path"
                             + (" into the backbone (it runs it under no_grad), so full fine-tuning "
                                "cannot be measured through it" if self.full_ft else ""))
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()

    def eval_step(self, batch):
        import torch

        self.method.eval()  # as Lightning sets it for the test loop
        with torch.no_grad(), autocast_for(self.precision, self.device):
            out = self.method(self.backbone, self.prepare(batch))
            self.task.update(out, batch, "test")
        return None

    def forward_only(self, batch):
        import torch

        self.fwd_method.train(self.method.training)  # the same forward the step runs
        with torch.no_grad(), autocast_for(self.precision, self.device):
            return self.fwd_method(self.backbone, self.prepare(batch, use_cache=False))


def _Joint(method, backbone):
    """A parameter holder for full fine-tuning: the method's parameters and the backbone's."""
    from torch import nn

    class Joint(nn.Module):
        def param_groups(self, cfg):
            return None

    j = Joint()
    j.method, j.backbone = method, backbone
    return j


# --------------------------------------------------------------------------- the interleaved timer
def _make_timer(plain: PlainLoop, device, warmup: int, stage: str, symmetric: bool = True):
    import lightning as L

    class Interleaved(L.Callback):
        """Between two framework steps, one plain-loop step and one forward-only, on the
        same batch; the framework step is the time between consecutive batch ends, less
        the time spent here."""

        def __init__(self):
            self.rows: list[tuple[float, float, float, int]] = []
            self.t_last: float | None = None
            self.n = 0
            self.symmetric = symmetric

        def _start(self, *args):
            if self.t_last is None:
                self.t_last, self.c_last = _now(device), time.process_time()

        def _end(self, batch, batch_idx):
            t, c = _now(device), time.process_time()
            fw, fw_cpu = t - self.t_last, c - self.c_last
            # the forward first, then the plain step, then (untimed) the forward again: the framework
            # step and the plain step each follow a forward-only pass, so both start from the same
            # cache state (a plain step right after the framework step on the same batch and
            # weights ran warm: coop's overhead read 1.16 in that order, see docs/bench.md)
            t0, c0 = _now(device), time.process_time()
            plain.forward_only(batch)
            t1, c1 = _now(device), time.process_time()
            if stage == "train":
                plain.step(batch, batch_idx)
            else:
                plain.eval_step(batch)
            t2, c2 = _now(device), time.process_time()
            if self.symmetric:
                plain.forward_only(batch)
            if self.n >= warmup:
                self.rows.append((fw, t2 - t1, t1 - t0, batch_size_of(batch), fw_cpu, c2 - c1, c1 - c0))
            self.n += 1
            self.t_last, self.c_last = _now(device), time.process_time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._end(batch, batch_idx)

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._start()

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self._end(batch, batch_idx)

    return Interleaved()


class _EpochTimer:
    def __new__(cls, device):
        import lightning as L

        class EpochTimer(L.Callback):
            def __init__(self):
                self.times: list[float] = []

            def on_train_epoch_start(self, trainer, pl_module):
                self.t0 = _now(device)

            def on_train_epoch_end(self, trainer, pl_module):
                self.times.append(_now(device) - self.t0)

        return EpochTimer()


def _trainer(cfg, root: Path, max_epochs: int, callbacks: list, limit_batches=None):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from prompttune.runs import trainer_kwargs

    kw = trainer_kwargs(cfg)
    for k in ("limit_train_batches", "limit_test_batches", "limit_val_batches", "enable_progress_bar",
              "log_every_n_steps", "max_epochs"):
        kw.pop(k, None)
    # the CSV logger and log interval a real `fit` run has, so logging is part of the cost
    return L.Trainer(max_epochs=max_epochs, logger=[CSVLogger(str(root), name="logs", version="")],
                     callbacks=callbacks, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                     limit_train_batches=limit_batches, limit_test_batches=limit_batches,
                     log_every_n_steps=int(cfg.trainer.get("log_every_n_steps") or 50),
                     default_root_dir=str(root), **kw)


def _device_of(cfg):
    import torch

    from prompttune.runs import trainer_kwargs

    kw = trainer_kwargs(cfg)
    accel = kw.get("accelerator", "cpu")
    if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device()), kw["precision"]
    return torch.device("cpu"), kw["precision"]


def count_step_flops(plain: PlainLoop, batch) -> float:
    """Model FLOPs of one training step (forward + backward), counted by PyTorch's
    ``FlopCounterMode`` on a throw-away copy (so the measured optimiser state is untouched)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            if plain.shim is not None:  # manual update rule: count one real step (tiny state change)
                plain.step(batch, 0)
            elif plain.opt is None:  # nothing trains: the evaluation forward
                plain.forward_only(batch)
            else:
                loss = plain.loss(batch)
                loss.backward()
                plain.opt.zero_grad(set_to_none=True)
    except Exception as err:  # FLOP counting is best-effort (exotic ops), never fatal
        log.warning("FLOP count failed (%s); tflops/mfu left empty", err)
        return 0.0
    return float(counter.get_total_flops())


def count_forward_flops(plain: PlainLoop, batch) -> float:
    """Model FLOPs of the forward alone (features recomputed), with grad mode on as the
    counter's module hooks need; nothing is backpropagated. ``step / forward`` near 2 means
    the backward computed input gradients only; near 3, weight gradients too."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.enable_grad(), autocast_for(plain.precision, plain.device):
            plain.fwd_method.train(True)
            plain.fwd_method(plain.backbone, plain.prepare(batch, use_cache=False))
    except Exception as err:
        log.warning("forward FLOP count failed (%s)", err)
        return 0.0
    return float(counter.get_total_flops())


def device_peak_tflops(device, override: float | None) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tf in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tf
    return None


# --------------------------------------------------------------------------- one method
def bench_method(method_name: str, overrides: list[str] | None = None, steps: int = 20,
                 opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure one method; returns its row (see the module docstring for each field)."""
    import torch

    from prompttune.runs import build, make_module

    o = dict(_BENCH_OPTS)
    o.update(opts or {})
    if int(o.get("threads") or 0) > 0:
        torch.set_num_threads(int(o["threads"]))
    cfg = compose_for(method_name, list(overrides or []), o.get("experiment"))
    device, precision = _device_of(cfg)
    t_build = time.perf_counter()
    backbone, dm, method, task = build(cfg)  # every input check runs here, before compute
    module = make_module(cfg, backbone, method, task)
    build_s = time.perf_counter() - t_build
    trains = module.trainable_params > 0
    stage = "train" if trains else "test"
    warmup = int(o["warmup"])
    n = warmup + int(steps)
    dm.setup("fit")
    loader = dm.train_dataloader() if trains else dm.test_dataloader()
    if not trains:  # evaluation batches at the training batch size, like for like
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=dm.batch_size,
                                             collate_fn=loader.collate_fn)
    batches = [to_device(b, device) for b in take_batches(loader, n)]
    backbone.to(device)
    module.to(device)

    try:
        plain_method = copy.deepcopy(method)
    except Exception:  # an un-copyable attribute: share the parameters (timing is unaffected)
        plain_method = method
    plain_task = copy.deepcopy(task)
    plain = PlainLoop(backbone, plain_method.to(device), plain_task.to(device), cfg.method.optim, n,
                      device, precision, cache=module.cache_features)
    flops = fwd_flops = 0.0
    if stage == "train":  # before compiling, on throw-away copies (methods may count their steps)
        try:
            counting = PlainLoop(backbone, copy.deepcopy(method), copy.deepcopy(task), cfg.method.optim, n,
                                 device, precision, cache=False)
        except Exception as err:  # an un-copyable method: no FLOP figures rather than a skewed timing
            log.warning("%s: no FLOP count (%s)", method_name, err)
        else:
            flops, fwd_flops = count_step_flops(counting, batches[0]), count_forward_flops(counting, batches[0])
            del counting
    if o["compile"]:
        method.compile()
        if plain_method is not method:
            plain_method.compile()
    timer = _make_timer(plain, device, warmup, stage, bool(o.get("symmetric", True)))
    ctx = tempfile.TemporaryDirectory(prefix="prompttune-bench-")
    with ctx as tmp, fused_attention(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        module.optim_cfg["epochs"] = 1
        trainer = _trainer(cfg, Path(tmp), 1, [timer])
        if trains:
            trainer.fit(module, train_dataloaders=Batches(batches))
        else:
            trainer.test(module, dataloaders=Batches(batches), verbose=False)
    rows = timer.rows
    if not rows:
        raise BenchError(f"{method_name}: no timed steps (steps={steps}, warm-up {warmup})")
    clock = o["clock"] if o["clock"] != "auto" else ("cpu" if device.type == "cpu" else "wall")
    k = 4 if clock == "cpu" else 0  # which columns of the timer's rows the ratios use
    fw, pl, fo = [r[k] for r in rows], [r[k + 1] for r in rows], [r[k + 2] for r in rows]
    bs = statistics.median(r[3] for r in rows)
    fw_med, pl_med, fo_med = statistics.median(fw), statistics.median(pl), statistics.median(fo)
    wall_med = statistics.median(r[0] for r in rows)
    row: dict[str, Any] = {
        "method": method_name,
        "backbone": cfg.choices.backbone,
        "data": cfg.choices.data,
        "stage": stage,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": str(precision),
        "compile": bool(o["compile"]),
        "clock": clock,
        "threads": torch.get_num_threads(),
        "batch_size": int(bs),
        "steps": len(rows),
        "trainable_params": module.trainable_params,
        "total_params": module.total_params,
        "fw_step_ms": round(1e3 * fw_med, 3),
        "plain_step_ms": round(1e3 * pl_med, 3),
        "fwd_ms": round(1e3 * fo_med, 3),
        "overhead_ratio": round(fw_med / pl_med, 3),
        "overhead_ratio_paired": round(statistics.median(f / p for f, p in zip(fw, pl)), 3),
        "limit_ratio": round(fw_med / fo_med, 3),
        "wall_step_ms": round(1e3 * wall_med, 3),
        "samples_per_s": round(bs / wall_med, 2),
        "build_s": round(build_s, 2),
    }
    if flops:
        tflops = flops / wall_med / 1e12
        peak = device_peak_tflops(device, o.get("peak_tflops"))
        row["gflops_per_step"] = round(flops / 1e9, 3)
        if fwd_flops:
            row["fwd_gflops"] = round(fwd_flops / 1e9, 3)
            row["flop_ratio"] = round(flops / fwd_flops, 3)  # ~2: no frozen-weight gradients
        row["tflops"] = round(tflops, 4)
        row["mfu"] = round(tflops / peak, 4) if peak else None
    if method.consumes == "image_features" and trains:
        row.update(_cache_speedup(cfg, dm, method_name, o, device))
    if o["memory"]:
        if device.type == "cuda":  # free this measurement's GPU memory before measuring peaks
            del batches, timer, trainer
            module.cpu()
            plain_method.cpu()
            torch.cuda.empty_cache()
        row.update(_memory_rows(method_name, overrides or [], o, device))
    else:
        row.setdefault("peak_mem_mb", round(peak_mb(device), 1))
    return row


def _cache_speedup(cfg, dm, method_name: str, o: dict[str, Any], device) -> dict[str, Any]:
    """Epoch 1 (features computed and cached) vs later epochs (read from the cache), through
    the real Trainer and DataLoader, on a freshly built module."""
    from prompttune.runs import build, make_module

    backbone, dm2, method, task = build(cfg)
    module = make_module(cfg, backbone, method, task)
    # the in-memory cache's own effect: epoch 1 computes the features (the on-disk store would
    # fill them before epoch 1, outside the epoch's time); later epochs run fused on the table
    module.use_feature_store = False
    if not module.cache_features:
        return {"cache_speedup": None, "cache_note": "feature cache off (augmentation or cache_features=false)"}
    epochs = int(o["cache_epochs"])
    module.optim_cfg["epochs"] = epochs
    timer = _EpochTimer(device)
    with tempfile.TemporaryDirectory(prefix="prompttune-bench-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        limit = int(o.get("cache_batches") or 0) or None  # 0: whole epochs
        trainer = _trainer(cfg, Path(tmp), epochs, [timer], limit_batches=limit)
        trainer.fit(module, datamodule=dm2)
    first, later = timer.times[0], statistics.median(timer.times[1:])
    return {"epoch1_s": round(first, 4), "epoch2plus_s": round(later, 4),
            "cache_speedup": round(first / later, 2)}


# --------------------------------------------------------------------------- memory, in fresh processes
def _memory_rows(method_name: str, overrides: list[str], o: dict[str, Any], device) -> dict[str, Any]:
    if device.type == "cuda":  # in-process: the CUDA allocator's peak is resettable
        prompt = measure_memory(method_name, overrides, full_ft=False, experiment=o.get("experiment"))
        full = measure_memory(method_name, overrides, full_ft=True, experiment=o.get("experiment"))
    else:  # peak RSS is process-wide and never falls: one fresh process each
        prompt = _memory_subprocess(method_name, overrides, False, o.get("experiment"), int(o.get("threads") or 0))
        full = _memory_subprocess(method_name, overrides, True, o.get("experiment"), int(o.get("threads") or 0))
    return {"peak_mem_mb": prompt.get("peak_mem_mb"), "train_mem_mb": prompt.get("train_mem_mb"),
            "full_ft_peak_mem_mb": full.get("peak_mem_mb"), "full_ft_train_mem_mb": full.get("train_mem_mb"),
            "full_ft_trainable_params": full.get("trainable_params"),
            **({"full_ft_note": full["note"]} if full.get("note") else {})}


def _memory_subprocess(method_name: str, overrides: list[str], full_ft: bool, experiment,
                       threads: int = 0) -> dict[str, Any]:
    payload = json.dumps({"method": method_name, "overrides": list(overrides), "full_ft": full_ft,
                          "experiment": experiment, "threads": threads})
    code = ("import json,sys,torch; from prompttune import _tvshim; _tvshim.install(); "
            "a=json.loads(sys.argv[1]); a['threads'] and torch.set_num_threads(a['threads']); "
            "from prompttune.runs import quiet_lightning; quiet_lightning(); "
            "from prompttune.bench import measure_memory; "
            "print('BENCH_MEMORY ' + json.dumps(measure_memory(a['method'], a['overrides'], a['full_ft'], "
            "experiment=a['experiment'])))")
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_MEMORY "):
            return json.loads(line[len("BENCH_MEMORY "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    log.warning("%s: memory measurement (full_ft=%s) failed: %s", method_name, full_ft, " | ".join(tail))
    return {}


def measure_memory(method_name: str, overrides: list[str], full_ft: bool = False, steps: int = 3,
                   experiment: str | None = None) -> dict[str, Any]:
    """Peak memory of a few plain-loop training steps of the method, or of full fine-tuning
    of its backbone (every backbone weight trainable, the method on top, same optimiser).

    ``peak_mem_mb`` is the peak during the training steps (sampled RSS on the CPU, see
    :class:`RSSSampler`; the allocator's peak on CUDA); ``train_mem_mb`` is that peak less
    what was resident just before training (model, data, interpreter), i.e. what training
    itself adds: activations kept for backward, gradients and optimiser state."""
    import torch

    from prompttune.runs import build, make_module

    cfg = compose_for(method_name, list(overrides), experiment)
    device, precision = _device_of(cfg)
    backbone, dm, method, task = build(cfg)
    module = make_module(cfg, backbone, method, task)
    dm.setup("fit")
    trains = module.trainable_params > 0 or full_ft
    loader = dm.train_dataloader()
    batches = [to_device(b, device) for b in take_batches(loader, steps)]
    backbone.to(device)
    method.to(device)
    task.to(device)
    plain = PlainLoop(backbone, method, task, cfg.method.optim, steps, device, precision,
                      cache=module.cache_features, full_ft=full_ft)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / 2**20
            with fused_attention(device):
                for i, b in enumerate(batches):
                    plain.step(b, i) if trains else plain.eval_step(b)
            peak = peak_mb(device)
        else:
            with RSSSampler() as sampler:  # peak RSS of the training steps alone (see RSSSampler)
                for i, b in enumerate(batches):
                    plain.step(b, i) if trains else plain.eval_step(b)
            base, peak = sampler.base, sampler.peak
    except BenchError as err:
        return {"note": str(err), "full_ft": full_ft}
    n_train = sum(p.numel() for p in list(method.parameters()) + list(backbone.parameters()) if p.requires_grad)
    return {"peak_mem_mb": round(peak, 1), "train_mem_mb": round(max(peak - base, 0.0), 1),
            "trainable_params": int(n_train), "full_ft": full_ft}


# --------------------------------------------------------------------------- table and entry point
_COLUMNS = [("method", "method", "{}"), ("backbone", "backbone", "{}"), ("stage", "step", "{}"),
            ("fw_step_ms", "step ms", "{:.2f}"), ("plain_step_ms", "plain ms", "{:.2f}"),
            ("fwd_ms", "fwd ms", "{:.2f}"), ("overhead_ratio", "overhead", "{:.3f}"),
            ("limit_ratio", "step/fwd", "{:.2f}"), ("samples_per_s", "samples/s", "{:.1f}"),
            ("cache_speedup", "cache x", "{:.1f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
            ("train_mem_mb", "train MB", "{:.0f}"), ("full_ft_train_mem_mb", "full-FT train MB", "{:.0f}"),
            ("tflops", "TFLOP/s", "{:.3f}"), ("mfu", "MFU", "{:.1%}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows (a missing or empty value prints as ``-``)."""
    def cell(row, key, fmt):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)

    head = "| " + " | ".join(c[1] for c in _COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(cell(r, k, f) for k, _, f in _COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def run_bench(method: str, overrides: list[str] | None = None, json_path: str | None = None,
              steps: int = 20) -> int:
    """``prompttune bench METHOD|all [key=value ...] [--json FILE] [--steps N]``; returns the exit code."""
    from prompttune.registry import METHODS, load_all

    load_all()
    if int(steps) < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    opts, rest = split_options(list(overrides or []))
    names = METHODS.names() if method == "all" else [method]
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; valid: all, {', '.join(METHODS.names())}")
        compose_for(name, rest, opts.get("experiment"))  # every config error before any compute
    rows, failed = [], []
    for name in names:
        t0 = time.perf_counter()
        try:
            row = bench_method(name, rest, steps=int(steps), opts=opts)
        except ConfigError:
            raise
        except Exception as err:  # one method failing must not lose the others' rows
            if len(names) == 1:
                raise
            log.error("%s: bench failed: %s: %s", name, type(err).__name__, err)
            failed.append(name)
            continue
        row["bench_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log.info("%s: step %.2f ms (plain %.2f, fwd %.2f), overhead %.3f, step/fwd %.2f", name,
                 row["fw_step_ms"], row["plain_step_ms"], row["fwd_ms"], row["overhead_ratio"], row["limit_ratio"])
        if json_path:  # after every method, so an interrupted `bench all` keeps what it measured
            _write_json(json_path, rows, steps, opts, rest)
    print(format_table(rows))
    if json_path:
        _write_json(json_path, rows, steps, opts, rest)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _write_json(path: str, rows: list[dict[str, Any]], steps: int, opts: dict[str, Any], overrides: list[str]) -> None:
    import platform

    import torch

    from prompttune.utils import atomic_write_json

    meta = {"steps_requested": int(steps), "bench_options": {k: v for k, v in opts.items() if v is not None},
            "overrides": list(overrides), "torch": torch.__version__, "host": platform.node(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(path, [{**row, **meta} for row in rows])  # a JSON list: one object per method


# --------------------------------------------------------------------------- scaling curves (`prompttune bench --sweep`)
def _cpu_time_per_call(fn, steps: int, warmup: int = 1) -> float:
    """Median process CPU seconds of ``fn()`` over ``steps`` calls after ``warmup`` (1 thread: CPU time is work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def curve_coop_classes(classes=(10, 20, 50, 100), batch: int = 32, steps: int = 2,
                       model: str = "ViT-B-16-quickgelu") -> list[dict[str, Any]]:
    """CoOp's training step against the number of classes, on CLIP ViT-B/16 (random weights): the
    image side is cached (random [B, 512] features), the text encoder runs forward and backward
    over every class's 77-token prompt each step, so time and activation memory grow linearly."""
    import torch
    import torch.nn.functional as F

    from prompttune.backbones.clip import CLIPBackbone
    from prompttune.methods.coop import CoOp, PromptLearner

    backbone = CLIPBackbone(model=model, weights="random")
    rows = []
    for n in classes:
        method = CoOp(n_ctx=16)
        method.prompt_learner = PromptLearner(backbone, [f"class {i}" for i in range(n)], **method.cfg)
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        batch_ = {"features": torch.randn(batch, backbone.embed_dim, generator=g),
                  "label": torch.randint(0, n, (batch,), generator=g)}

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(method(backbone, batch_)["logits"], batch_["label"]).backward()
            opt.step()

        step()
        with RSSSampler() as mem:
            t = _cpu_time_per_call(step, steps, warmup=0)
        rows.append({"curve": "coop_classes", "x": n, "step_ms": round(1e3 * t, 1),
                     "train_mem_mb": round(mem.peak - mem.base, 1), "batch_size": batch, "model": model})
        log.info("coop classes=%d: %.0f ms, +%.0f MB", n, 1e3 * t, mem.peak - mem.base)
    return rows


def curve_retrieval(gallery=(1000, 3000, 10000, 30000, 100000), queries: int = 1000, dim: int = 512,
                    full=(1000, 2000, 5000, 10000, 20000)) -> list[dict[str, Any]]:
    """Retrieval evaluation (prompttune.tasks.retrieval: chunked scores + best-correct rank) on random
    L2-normalised features: ``queries`` fixed against a growing gallery (linear in G), and the full
    symmetric i2t + t2i evaluation of N items against each other (quadratic in N)."""
    import torch
    import torch.nn.functional as F

    from prompttune.tasks.retrieval import best_correct_rank_chunked, per_item_recalls

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in gallery:
        gal = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
        q = F.normalize(torch.randn(queries, dim, generator=g), dim=-1)
        qk, gk = torch.arange(queries) % n, torch.arange(n)
        t = _cpu_time_per_call(lambda: best_correct_rank_chunked(q, gal, qk, gk), 1, warmup=0)
        rows.append({"curve": "retrieval_gallery", "x": n, "eval_ms": round(1e3 * t, 1), "queries": queries, "dim": dim})
        log.info("retrieval gallery=%d: %.0f ms", n, 1e3 * t)
    for n in full:
        img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
        txt = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
        t = _cpu_time_per_call(lambda: per_item_recalls(img, txt, torch.arange(n)), 1, warmup=0)
        rows.append({"curve": "retrieval_full", "x": n, "eval_ms": round(1e3 * t, 1), "dim": dim})
        log.info("retrieval full N=%d: %.0f ms", n, 1e3 * t)
    return rows


def curve_method_steps(method: str, key: str, xs, overrides: list[str], steps: int = 2,
                       curve: str | None = None, reuse_backbone: bool = False, forward: bool = True,
                       probe=None) -> list[dict[str, Any]]:
    """One method's plain-loop training step (forward, task loss, backward, optimiser step: the
    computation, without the framework) and its forward, against config value ``key`` = x.

    ``reuse_backbone``: build the frozen backbone once and give it to every point (for a ``key``
    that does not change it, e.g. the batch size or k; building a real-size backbone with random
    weights costs tens of CPU seconds); a point whose backbone config differs is an error.
    ``forward=False`` skips the separate forward timing. ``probe(plain, batch)``: a context manager
    around the warm-up and timed steps that yields a dict of extra fields for the row (filled by
    the time the steps are done, e.g. by a spy on a backbone method)."""
    from unittest import mock

    import torch
    from omegaconf import OmegaConf

    from prompttune import runs

    rows = []
    shared, shared_cfg = None, None
    for x in xs:
        cfg = compose_for(method, [*overrides, f"{key}={x}"])
        if reuse_backbone and shared is not None:
            if OmegaConf.to_container(cfg.backbone, resolve=True) != shared_cfg:
                raise BenchError(f"curve {curve or method}: {key}={x} changes the backbone config, so the "
                                 "backbone cannot be reused across points (reuse_backbone=False)")
            with mock.patch.object(runs, "build_backbone", lambda _cfg: shared):  # runs.build, same backbone
                backbone, dm, m, task = runs.build(cfg)
        else:
            backbone, dm, m, task = runs.build(cfg)
            if reuse_backbone:
                shared, shared_cfg = backbone, OmegaConf.to_container(cfg.backbone, resolve=True)
        module = runs.make_module(cfg, backbone, m, task)
        dm.setup("fit")
        batch = take_batches(dm.train_dataloader(), 1)[0]
        plain = PlainLoop(backbone, m, task, cfg.method.optim, steps + 2, torch.device("cpu"),
                          cache=module.cache_features)
        with (probe(plain, batch) if probe is not None else nullcontext({})) as extra:
            plain.step(batch)
            with RSSSampler() as mem:
                t = _cpu_time_per_call(lambda: plain.step(batch), steps, warmup=0)
        row = {"curve": curve or f"{method}_{key}", "x": x, "step_ms": round(1e3 * t, 1)}
        if forward:
            row["fwd_ms"] = round(1e3 * _cpu_time_per_call(lambda: plain.forward_only(batch), 1, warmup=0), 1)
        row.update({"train_mem_mb": round(mem.peak - mem.base, 1), "trainable_params": module.trainable_params,
                    "batch_size": batch_size_of(batch), "backbone": cfg.choices.backbone,
                    "backbone_name": getattr(backbone, "name", None), "timed_steps": steps})
        row.update(extra)
        rows.append(row)
        log.info("%s %s=%s: step %.0f ms, fwd %s ms", method, key, x, 1e3 * t, row.get("fwd_ms"))
        del plain, module, backbone, m, task, dm
    return rows


MAE_VQGAN_LARGE = ["backbone=mae_vqgan_large", "backbone.mae_checkpoint=null", "backbone.vqgan_checkpoint=null"]


def curve_icl_canvas_batch(method: str = "e_inmemo", batches=(1, 2, 4), steps: int = 1,
                           overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """A visual-ICL prompt's plain-loop step through the frozen MAE-VQGAN against the batch size
    (canvases per step). Default: the real-size backbone (MAE ViT-L/16, decoder 8x512, VQGAN f16
    with 1024 codes, 224-px canvases; random weights). Each canvas costs the same (enhancers,
    canvas, VQGAN tokens of the label canvas, MAE forward, backward to the pixels), so the step
    should be linear in the batch."""
    ov = MAE_VQGAN_LARGE if overrides is None else list(overrides)

    @contextmanager
    def probe(plain, batch):
        geom = plain.backbone.geometry
        yield {"canvas_px": int(plain.backbone.image_size), "cell_px": int(batch["query_image"].shape[-1]),
               "patch": int(geom.patch), "tokens": int((geom.size // geom.patch) ** 2)}

    return curve_method_steps(method, "data.batch_size", batches, ov, steps=steps, curve=f"{method}_batch",
                              reuse_backbone=True, probe=probe)


def curve_blip2_k(ks=(0, 2, 4), batch: int = 1, steps: int = 1, overrides: list[str] | None = None,
                  method: str = "mhub") -> list[dict[str, Any]]:
    """M-Hub's plain-loop step on BLIP-2 against the number of demonstrations k. Default: BLIP-2's
    ViT-g/14 (224 px) and Q-Former with an OPT-125m-sized LM (12 layers, 768 wide), random weights,
    from a ``save_pretrained``-style folder written to a temporary directory (the GPU check's, with
    the world tokenizer: nothing downloaded). Each demonstration adds one image through the frozen
    ViT and one Q-Former pass (forward and backward), and its text to the LM's sequence: linear in
    k + 1, plus the LM's attention, quadratic in its (short) sequence. Rows carry the LM sequence
    length the step fed (``lm_seq_len``) and the images it encoded."""
    with tempfile.TemporaryDirectory(prefix="prompttune-blip2-opt125m-") as tmp:
        if overrides is None:
            from prompttune.gpu_check import write_blip2_opt125m

            write_blip2_opt125m(Path(tmp))
            ov = ["backbone=zoo_blip2", "backbone.zoo_entry=null", f"backbone.model={tmp}"]
        else:
            ov = list(overrides)

        @contextmanager
        def probe(plain, b):
            bb, vc = plain.backbone, plain.backbone.model.config.vision_config
            lm = bb.language_model.config
            fields = {"images_per_step": batch_size_of(b) * (1 + plain.method.k),
                      "vision": f"ViT {vc.num_hidden_layers}x{vc.hidden_size}, {vc.image_size} px",
                      "lm": f"{lm.model_type} {lm.num_hidden_layers}x{lm.hidden_size}"}
            lm_loss = bb.lm_loss

            def spy(prefix, mask, *a, **kw):  # what the LM is fed: prefix + target tokens
                fields["lm_prefix_len"] = int(prefix.shape[1])
                return lm_loss(prefix, mask, *a, **kw)

            bb.lm_loss = spy  # an instance attribute over the method, removed after the steps
            try:
                yield fields
            finally:
                del bb.lm_loss

        return curve_method_steps(method, "method.k", ks, [*ov, f"data.batch_size={batch}"], steps=steps,
                                  curve=f"{method}_blip2_k", reuse_backbone=True, forward=False, probe=probe)


def measure_fused_epochs(method: str, epochs: int = 30, batch_size: int = 8) -> dict[str, Any]:
    """Per-step CPU time of training epochs on cached features through the real Trainer and
    DataLoader -- Lightning's per-batch loop (``features.fused_epochs=false``) and the fused epoch
    loop -- each interleaved epoch by epoch with the plain loop on the same batches (a callback runs
    one plain epoch after each framework epoch). Epoch 1 (which fills the cache) is dropped."""
    import lightning as L
    import torch

    from prompttune.runs import build, make_module

    cfg = compose_for(method, [f"data.batch_size={batch_size}", f"method.optim.epochs={epochs}"])

    class Interleaved(L.Callback):
        def __init__(self, plain, batches):
            self.fw, self.pl, self.plain, self.batches = [], [], plain, batches

        def on_train_epoch_start(self, *args):
            self.c0 = time.process_time()

        def on_train_epoch_end(self, *args):
            self.fw.append(time.process_time() - self.c0)
            c0 = time.process_time()
            for i, b in enumerate(self.batches):
                self.plain.step(b, i)
            self.pl.append(time.process_time() - c0)

    row: dict[str, Any] = {"curve": "fused_epochs", "method": method, "x": batch_size, "batch_size": batch_size,
                           "epochs": epochs}
    for fused in (True, False):
        backbone, dm, m, task = build(cfg)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        plain = PlainLoop(backbone, copy.deepcopy(m), copy.deepcopy(task), cfg.method.optim, epochs * len(batches),
                          torch.device("cpu"), cache=True)
        for b in batches:
            plain.prepare(b)
        module = make_module(cfg, backbone, m, task)
        module.use_feature_store = False  # epoch 1 fills the cache; the later ones are measured
        module.fused_epochs = fused
        cb = Interleaved(plain, batches)
        with tempfile.TemporaryDirectory(prefix="prompttune-bench-") as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            _trainer(cfg, Path(tmp), epochs, [cb]).fit(module, datamodule=dm)
        fw, pl, n = cb.fw[1:], cb.pl[1:], len(batches)
        tag = "fused" if fused else "lightning"
        row[f"{tag}_step_ms"] = round(1e3 * statistics.median(fw) / n, 3)
        row[f"{tag}_plain_step_ms"] = round(1e3 * statistics.median(pl) / n, 3)
        row[f"{tag}_ratio"] = round(statistics.median(fw) / statistics.median(pl), 3)
        row[f"{tag}_ratio_paired"] = round(statistics.median(f / q for f, q in zip(fw, pl)), 3)
        row["steps_per_epoch"] = n
    log.info("fused epochs %s: %s", method, row)
    return row


CURVES = {
    "fused_epochs": lambda: [measure_fused_epochs("linear_probe", 30, 8), measure_fused_epochs("coop", 8, 32)],
    "coop_classes": lambda: curve_coop_classes(),
    "retrieval": lambda: curve_retrieval(),
    "vpt_prompts": lambda: curve_method_steps("vpt", "method.num_prompts", (1, 10, 50, 100),
                                              ["backbone=vit_b16_in21k", "data.batch_size=4"], curve="vpt_shallow_P"),
    "vpt_deep_prompts": lambda: curve_method_steps("vpt_deep", "method.num_prompts", (1, 10, 50, 100),
                                                   ["backbone=vit_b16_in21k", "data.batch_size=4"], curve="vpt_deep_P"),
    "mhub_k": lambda: curve_method_steps("mhub", "method.k", (0, 1, 2, 3, 4), ["data.batch_size=8"], steps=10,
                                         curve="mhub_k"),
    "mae_vqgan_batch": lambda: curve_icl_canvas_batch("e_inmemo", (1, 2, 4)),
    "blip2_opt125m_k": lambda: curve_blip2_k((0, 2, 4)),
}


def run_curves(names: list[str], out_dir: str) -> int:
    """``prompttune bench --sweep NAME [NAME ...] --out DIR``: each curve's rows into DIR/NAME.json
    and a plot DIR/NAME.png (CPU, one thread, random weights)."""
    import torch

    torch.set_num_threads(1)
    bad = [n for n in names if n not in CURVES]
    if bad or not names:
        raise BenchError(f"unknown curve(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(CURVES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from prompttune.utils import atomic_write_json

    for name in names:
        rows = CURVES[name]()
        atomic_write_json(out / f"{name}.json", rows)
        if any(r.get(f) for r in rows for f in ("step_ms", "eval_ms", "train_mem_mb")):
            plot_curve(rows, out / f"{name}.png")
        print(json.dumps(rows))
    return 0


_XLABELS = {"coop_classes": "classes (text encoder runs over each class's 77-token prompt)",
            "retrieval_gallery": "gallery size G (1k queries) / items N (full i2t + t2i)",
            "vpt_shallow_P": "prompt length P", "vpt_deep_P": "prompt length P", "mhub_k": "demonstrations k",
            "e_inmemo_batch": "canvases per step (batch; 224-px canvas, MAE ViT-L/16 + VQGAN f16)",
            "mhub_blip2_k": "demonstrations k (batch 1; k + 1 images through ViT-g/14)"}


def plot_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log plot of each curve in ``rows`` (time, and memory where measured), with a fitted slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves: dict[str, list] = {}
    for r in rows:
        curves.setdefault(r["curve"], []).append(r)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    loglog = all(r["x"] > 0 for r in rows)  # a curve from x=0 (M-Hub's k) on linear axes
    for name, rs in curves.items():
        for field in ("step_ms", "eval_ms", "train_mem_mb"):
            pts = [(r["x"], r[field]) for r in rs if r.get(field) and (r["x"] > 0 or not loglog)]
            if len(pts) < 2:
                continue
            x, y = np.array(pts, dtype=float).T
            if loglog:
                slope = float(np.polyfit(np.log(x), np.log(y), 1)[0])
                ax.plot(x, y, "o-", label=f"{name} {field} (log-log slope {slope:.2f})")
            else:  # axes from x = 0: the linear fit's increment per unit of x
                inc = float(np.polyfit(x, y, 1)[0])
                ax.plot(x, y, "o-", label=f"{name} {field} (linear fit {inc:+.4g} per unit)")
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    xs = sorted({r["x"] for r in rows})
    if len(xs) <= 6:  # few points: tick exactly the measured x values, as plain numbers
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(_XLABELS.get(rows[0]["curve"], "x"))
    ax.set_ylabel("CPU ms per step / evaluation; MB added by training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
