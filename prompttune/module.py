"""PromptTuningModule: the one LightningModule every method plugs into.

It owns what all methods share: the optimiser over the method's parameters only (and a
check that nothing else requires grad), the learning-rate schedule, the frozen-feature
cache for methods that read pooled image features, metrics through the task, the
logging of parameter counts, throughput and memory, and checkpoints that hold the
trainable state only.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn

from prompttune.utils import count_params, peak_memory_mb

# Lightning warns once per fit that the module's transfer_batch_to_device wins over the datamodule's;
# ours is only a faster walk of the same dicts (datamodules here define none), so the warning is noise
warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`")


class FeatureCache(nn.Module):
    """Pooled frozen-backbone image features, one row per dataset index, filled on first sight.

    Valid because the backbone is frozen and the transform deterministic (the run disables
    the cache when training augmentation is on). Lives on the module's device, so a cached
    epoch makes no host-device copies of images at all.
    """

    def __init__(self):
        super().__init__()
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, key: str, index: torch.Tensor, images_fn) -> torch.Tensor:
        size = int(index.max()) + 1
        feats, filled = self.store.get(key, (None, None))
        missing = None if filled is None or filled.numel() < size else ~filled[index]
        if missing is not None and not bool(missing.any()):
            return feats[index]
        new = images_fn()  # [B, D], computed under no_grad by the caller
        if feats is None or feats.shape[0] < size:
            grow = max(size, 2 * (0 if feats is None else feats.shape[0]))
            f2 = new.new_zeros((grow, new.shape[1]))
            m2 = torch.zeros(grow, dtype=torch.bool, device=new.device)
            if feats is not None:
                f2[: feats.shape[0]] = feats
                m2[: filled.shape[0]] = filled
            feats, filled = f2, m2
        feats[index] = new.to(feats.dtype)
        filled[index] = True
        self.store[key] = (feats, filled)
        return new

    def complete(self, key: str, n: int) -> bool:
        """Whether rows ``0..n-1`` of ``key`` are all cached."""
        entry = self.store.get(key)
        return entry is not None and entry[1].numel() >= n and bool(entry[1][:n].all())

    def put(self, key: str, feats: torch.Tensor, filled: torch.Tensor) -> None:
        """Install a whole table (rows by dataset index), e.g. from the on-disk feature store."""
        self.store[key] = (feats, filled)

    def clear(self) -> None:
        self.store.clear()


class PromptTuningModule(L.LightningModule):
    def __init__(self, backbone: nn.Module, method: nn.Module, task: nn.Module,
                 optim: dict[str, Any] | None = None, cache_features: bool = True, feature_store: bool = True,
                 fused_epochs: bool = True):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.task = task
        self.optim_cfg = dict(optim or {})
        self.cache_features = cache_features and method.consumes == "image_features"
        self.feature_cache = FeatureCache()
        # the on-disk store (prompttune.features) fills the cache before a loop starts, once per
        # sweep rather than once per run; `features.store: false` leaves only the in-memory cache
        self.use_feature_store = feature_store and self.cache_features
        # once the training rows' features are all cached, an epoch runs as one plain loop on the
        # feature table (see _run_fused_epoch); `features.fused_epochs: false` keeps Lightning's loop
        self.fused_epochs = fused_epochs
        self.fused_epoch_incomplete = False  # set by a fused epoch an interrupt cut short
        self.feature_store_log: dict[str, dict[str, Any]] = {}
        self.automatic_optimization = not method.manual_optimization
        # checkpoints hold only the method's state; loading must not demand backbone keys
        self.strict_loading = False
        self.stats: dict[str, float] = {}
        self._train_samples = 0
        self._train_time = 0.0
        self._steps = 0
        self._epoch_open = False
        # the split whose metrics the validation loop logs: "test" under `select: test`, where the
        # per-epoch evaluation runs on the test split (prompttune.runs)
        self.val_stage = "val"
        self.assert_only_method_trains()

    # ------------------------------------------------------------------ per-step fast paths
    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets plain attributes (``_current_fx_name``, ...) on the module around every
        # hook call, ~46 times a step; nn.Module.__setattr__ checks parameters, buffers and
        # submodules each time. A plain value replacing a plain attribute skips those checks (a
        # name in __dict__ is never also a parameter, buffer or submodule).
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, skipped for per-step training values on steps the loggers do not
        write (~0.3-0.5 ms a call: a manual-optimisation method such as VP/TVP logs its loss terms
        every step). Values logged with ``on_epoch=True`` (epoch means) are always kept."""
        if (self._trainer is not None and not kwargs.get("on_epoch") and not args
                and self._current_fx_name == "training_step"
                and not self.trainer._logger_connector.should_update_logs):
            return
        super().log(name, value, *args, **kwargs)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The batch on ``device``: dicts, lists and tuples walked directly (Lightning's generic
        ``apply_to_collection`` costs ~0.1 ms a step in ABC checks); other types go to Lightning.
        A datamodule with its own ``transfer_batch_to_device`` keeps it (Lightning would call ours)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and type(dm).transfer_batch_to_device is not L.LightningDataModule.transfer_batch_to_device:
            return dm.transfer_batch_to_device(batch, device, dataloader_idx)
        try:
            return _to_device(batch, device)
        except _Unhandled:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ invariants
    def assert_only_method_trains(self) -> None:
        mine = {id(p) for p in self.method.parameters()}
        stray = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in mine]
        if stray:
            raise RuntimeError(
                f"only the method's parameters may require grad; these do too: {', '.join(stray[:5])}"
                + (" ..." if len(stray) > 5 else "")
            )

    @property
    def trainable_params(self) -> int:
        return count_params(self.method, trainable=True)

    @property
    def total_params(self) -> int:
        # a parameter shared by both (peft adapters injected into the backbone) counts once
        seen = {id(p): p for m in (self.backbone, self.method) for p in m.parameters()}
        return sum(p.numel() for p in seen.values())

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(False)  # the frozen backbone stays in eval mode
        return self

    # ------------------------------------------------------------------ forward
    def prepare_batch(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        if self.method.consumes != "image_features":
            return batch
        batch = dict(batch)

        def encode():
            if "image" not in batch:
                raise RuntimeError("a batch without pixels missed the feature cache; was the dataset changed?")
            with torch.no_grad():
                return self.backbone.encode_image(batch["image"]).float()

        if self.cache_features and "index" in batch:
            batch["features"] = self.feature_cache.get(stage, batch["index"], encode)
        else:
            batch["features"] = encode()
        return batch

    def _stop_decoding_cached_images(self) -> None:
        """Once every training row's features are cached, later epochs need no pixels: tell the
        dataset to skip reading and decoding images (only with in-process loading, where the
        flag reaches the dataset; worker processes keep their own copy)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        ds = getattr(dm, "datasets", {}).get("train") if dm is not None else None
        if ds is None or not hasattr(ds, "load_images") or getattr(dm, "num_workers", 1) != 0:
            return
        entry = self.feature_cache.store.get("train")
        if entry is not None and entry[1].numel() >= len(ds) and bool(entry[1][: len(ds)].all()):
            ds.load_images = False

    def _fill_from_store(self, stage: str, loaders: Any, limit: Any = 1.0) -> None:
        """Before a loop over ``loaders``: load the whole table of frozen features for ``stage``
        from the on-disk store, computing and storing it in one ordered pass on a miss (one
        process per key computes; the others wait and read: prompttune.features). Then, with
        in-process loading, the loop reads no pixels at all. A loader whose dataset has no
        stable key (not a list of image files, a randomising transform) keeps the lazy cache, and
        so does a loop limited to part of its data (``trainer.limit_*_batches``: smoke and debug
        runs, where encoding the whole split would cost more than it saves)."""
        if not self.use_feature_store or self._trainer is None:
            return
        if not (isinstance(limit, float) and limit == 1.0):  # an int is a batch count, even 1
            return
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and len(loaders) == 1 else loaders
        ds = getattr(loader, "dataset", None)
        if ds is None or not hasattr(loader, "batch_size") or self.feature_cache.complete(stage, len(ds)):
            return
        from prompttune import features

        t0 = time.perf_counter()
        precision = str(self.trainer.precision)
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
        key = features.feature_key(self.backbone, ds, "encode_image", dtype)
        if key is None:
            return
        if getattr(self, "_feature_store", None) is None:
            self._feature_store = features.FeatureStore()
        store = self._feature_store
        misses = store.misses
        feats, filled = store.get_or_compute(key, lambda: features.encode_dataset(
            self.backbone.encode_image, ds, self.device, batch_size=max(int(loader.batch_size or 1), 64),
            num_workers=int(getattr(loader, "num_workers", 0)), collate_fn=loader.collate_fn,
            context=self.trainer.precision_plugin.forward_context))
        self.feature_cache.put(stage, feats.to(self.device), filled.to(self.device))
        if getattr(loader, "num_workers", 1) == 0 and hasattr(ds, "load_images") and bool(filled.all()):
            ds.load_images = False  # every row cached: the loop needs labels and indices only
        self.feature_store_log[stage] = {"hit": store.misses == misses, "rows": int(filled.sum()),
                                         "seconds": round(time.perf_counter() - t0, 3),
                                         "file": str(store.path_for(key))}
        self.stats["feature_store_s"] = self.stats.get("feature_store_s", 0.0) + time.perf_counter() - t0

    def on_test_start(self):
        self._fill_from_store("test", self.trainer.test_dataloaders, self.trainer.limit_test_batches)

    # ------------------------------------------------------------------ fused epochs on cached features
    def _fused_epoch_plan(self):
        """``(loader, dataset, feats)`` when this epoch can run as one tight loop over the cached
        feature table, else ``None``. It can when every training row's features are cached, the
        rows carry only ``label`` (so the fused batch ``{index, label, features}`` is exactly what
        the Lightning loop would hand the method), the sampler is deterministic per epoch (the
        fused loop re-draws the very batches the DataLoader yields), and nothing per-step is
        configured that the loop would have to imitate (several devices, gradient accumulation
        or clipping, a step budget, a batch limit, fp16 loss scaling)."""
        if not (self.fused_epochs and self.cache_features and self.automatic_optimization) or self._trainer is None:
            return None
        t = self.trainer
        if (t.world_size != 1 or t.accumulate_grad_batches != 1 or t.gradient_clip_val or t.max_steps != -1
                or not (isinstance(t.limit_train_batches, float) and t.limit_train_batches == 1.0)
                or str(t.precision).startswith("16") or len(t.optimizers) != 1):
            return None
        from torch.utils.data import SequentialSampler

        from prompttune.data.base import EpochSeededSampler

        loader = t.train_dataloader
        ds = getattr(loader, "dataset", None)
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        if (ds is None or getattr(ds, "keys", None) != ("label",) or getattr(ds, "collate", None) is not None
                or not isinstance(sampler, (EpochSeededSampler, SequentialSampler))
                or not self.feature_cache.complete("train", len(ds))):
            return None
        try:
            self.trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step  # noqa: B018
        except AttributeError:  # another Lightning: its step counter is not where we keep global_step right
            return None
        return loader, ds, self.feature_cache.store["train"][0]

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx != 0:
            return None
        plan = self._fused_epoch_plan()
        if plan is None:
            return None
        self._run_fused_epoch(*plan)
        return -1  # Lightning skips the rest of the epoch's batches: they were all trained above

    def _run_fused_epoch(self, loader, ds, feats) -> None:
        """One epoch as a plain loop on the cached feature table: the DataLoader's own batches (its
        batch sampler, re-iterated: the epoch's permutation is a function of seed and epoch), the
        method and task loss under the precision plugin's context, ``zero_grad`` / ``backward`` /
        ``step`` of the raw optimiser, the step-interval LR schedulers, and Lightning's optimiser
        step counter (``global_step``) advanced per step -- what the Lightning loop does, without
        its ~1-2 ms of per-step hooks (docs/bench.md). Lightning itself steps the step-interval
        schedulers once after a skipped epoch, so the loop steps them for all steps but the last."""
        t = self.trainer
        labels = getattr(ds, "_fused_labels", None)
        if labels is None or labels.device != self.device:
            labels = torch.tensor([it["label"] for it in ds.items], device=self.device)
            ds._fused_labels = labels
        opt = t.optimizers[0]
        scheds = [c.scheduler for c in t.lr_scheduler_configs if c.interval == "step" and not c.reduce_on_plateau]
        counter = t.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
        index_lists = list(loader.batch_sampler)
        losses = []
        for i, idx in enumerate(index_lists):
            index = torch.as_tensor(idx, device=self.device)
            batch = {"index": index, "label": labels[index], "features": feats[index]}
            with t.precision_plugin.forward_context():
                loss = self.task.loss(self.method(self.backbone, batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            counter.increment_ready()
            counter.increment_completed()
            losses.append(loss.detach())
            if t.should_stop:  # SIGINT/SIGTERM (prompttune.runs): stop after this step, as Lightning would
                break
            if i < len(index_lists) - 1:
                for sched in scheds:
                    sched.step()
        # An epoch cut short by an interrupt is marked incomplete: LastCheckpoint then keeps the
        # previous epoch's checkpoint, and the resumed run trains this epoch again from its start
        # (the sampler is seeded by the epoch). Lightning counts a fused epoch as one skipped batch
        # with ``is_last_batch`` set, so without the mark the cut epoch would pass for a whole one.
        self.fused_epoch_incomplete = len(losses) < len(index_lists)
        if not losses:
            return
        mean = torch.stack(losses).mean()
        if not torch.isfinite(torch.stack(losses)).all():
            bad = int((~torch.isfinite(torch.stack(losses))).nonzero()[0])
            raise FloatingPointError(f"non-finite training loss at epoch {self.current_epoch}, step "
                                     f"{self.global_step - len(losses) + bad}, batch {bad}; stopping")
        self.log("train/loss", mean, prog_bar=True, batch_size=len(index_lists[0]))
        self._epoch_samples += sum(len(idx) for idx in index_lists[:len(losses)])
        self._steps += len(losses)

    def forward(self, batch: dict[str, Any], stage: str = "predict") -> dict[str, Any]:
        return self.method(self.backbone, self.prepare_batch(batch, stage))

    def _batch_size(self, batch: dict[str, Any]) -> int:
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
            if isinstance(v, (list, tuple)):
                return len(v)
        return 1

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        if self.method.manual_optimization:
            loss = self.method.manual_step(self, self.prepare_batch(batch, "train"), batch_idx)
        else:
            outputs = self(batch, "train")
            loss = self.task.loss(outputs, batch)
        logging_step = self._trainer is None or self.trainer._logger_connector.should_update_logs
        # On CPU the check is free; on CUDA it synchronises, so it runs on logging steps only
        # (the step named is then the first logging step at or after the bad one).
        if (self.device.type != "cuda" or logging_step) and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, "
                f"step {self.global_step}, batch {batch_idx}; stopping"
            )
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=self._batch_size(batch))  # logging steps only
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        outputs = self(batch, stage)
        self.task.update(outputs, batch, stage)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_stage)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        metrics = self.task.compute(stage)
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, sync_dist=False)
        items = self.task.take_items(stage)  # per-item scores: runs.py writes the final test's
        if stage == "test":
            self.test_items = items
        self.task.reset(stage)

    def on_validation_epoch_end(self):
        self._log_metrics(self.val_stage)

    def on_test_epoch_end(self):
        self._log_metrics("test")

    # ------------------------------------------------------------------ timing / stats
    def on_train_start(self):
        self.assert_only_method_trains()
        self._fill_from_store("train", self.trainer.train_dataloader, self.trainer.limit_train_batches)
        if self.global_step == 0:  # not again when a run resumes: its metrics.csv already has them
            self.log_dict({"params/trainable": float(self.trainable_params),
                           "params/total": float(self.total_params)}, rank_zero_only=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_epoch_start(self):
        self.fused_epoch_incomplete = False
        self._epoch_t0 = time.perf_counter()
        self._epoch_samples = 0
        self._epoch_eval_time = 0.0  # per-epoch validation (select: val|test) is not training time
        self._epoch_open = True

    def on_validation_start(self):
        self._val_t0 = time.perf_counter()
        self._fill_from_store(self.val_stage, self.trainer.val_dataloaders, self.trainer.limit_val_batches)

    def on_validation_end(self):
        if self._epoch_open:
            self._epoch_eval_time += time.perf_counter() - self._val_t0

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._epoch_samples += self._batch_size(batch)
        self._steps += 1
        if self.device.type != "cuda" and self._steps % 10 == 1:  # sampled: reading /proc costs ~10 us
            self._peak_mem = max(getattr(self, "_peak_mem", 0.0), peak_memory_mb(self.device))

    def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        if self.device.type != "cuda":
            self._peak_mem = max(getattr(self, "_peak_mem", 0.0), peak_memory_mb(self.device))

    @property
    def peak_mem_mb(self) -> float:
        """Peak memory of this run: CUDA's allocator peak, or the max RSS sampled during the run."""
        if self.device.type == "cuda":
            return peak_memory_mb(self.device)
        return max(getattr(self, "_peak_mem", 0.0), peak_memory_mb(self.device))

    def on_train_epoch_end(self):
        if self.cache_features:
            self._stop_decoding_cached_images()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._epoch_t0 - self._epoch_eval_time
        self._train_time += dt
        self._train_samples += self._epoch_samples
        self._epoch_open = False
        world = self.trainer.world_size if self._trainer is not None else 1
        self.stats.update(
            train_time_s=self._train_time,
            samples_per_s=world * self._train_samples / max(self._train_time, 1e-9),
            step_time_s=self._train_time / max(self._steps, 1),
            epoch_time_s=dt,
            peak_mem_mb=self.peak_mem_mb,
        )
        self.log_dict({"perf/samples_per_s": self.stats["samples_per_s"],
                       "perf/step_time_s": self.stats["step_time_s"],
                       "perf/epoch_time_s": dt,
                       "perf/peak_mem_mb": self.stats["peak_mem_mb"]}, rank_zero_only=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.method.parameters() if p.requires_grad]
        if not params:
            return None
        groups = self.method.param_groups(cfg) or [{"params": params}]
        name = str(cfg.get("name", "adamw")).lower()
        lr = float(cfg.get("lr", 1e-3))
        wd = float(cfg.get("weight_decay", 0.0))
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
        extra = {"momentum": float(cfg.get("momentum", 0.9))} if name == "sgd" else {}
        opt = OPTIMIZERS[name](groups, lr=lr, weight_decay=wd, **extra)
        if self.method.manual_optimization:
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = str(cfg.get("scheduler", "cosine"))
        min_ratio = float(cfg.get("min_lr", 0.0)) / lr if lr > 0 else 0.0
        if str(cfg.get("warmup_type", "linear")) == "constant":  # Dassl's, stepped per epoch (CoOp)
            warmup_lr = float(cfg.get("warmup_lr", 1e-5))
            fn = constant_warmup_lambda(sched, epochs, int(cfg.get("warmup_epochs", 0)), warmup_lr / lr, min_ratio)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, fn)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        warmup = int(round(float(cfg.get("warmup_epochs", 0)) * total / epochs))
        if int(cfg.get("warmup_steps", 0) or 0) > 0:  # a warm-up counted in steps (MMICT/LAVIS: 1000) wins
            warmup = min(int(cfg["warmup_steps"]), total)
        fn = lr_lambda(sched, total, warmup, min_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("method.")}
        # train-time bookkeeping, so a resumed run reports the time and samples of all its sessions.
        # last.ckpt is written by a callback's on_train_epoch_end, which Lightning calls before this
        # module's: the epoch still open then is counted here.
        open_dt = time.perf_counter() - self._epoch_t0 - self._epoch_eval_time if self._epoch_open else 0.0
        checkpoint["prompttune"] = {
            "train_time_s": self._train_time + open_dt,
            "train_samples": self._train_samples + (self._epoch_samples if self._epoch_open else 0),
            "steps": self._steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("prompttune") or {}
        self._train_time = float(saved.get("train_time_s", 0.0))
        self._train_samples = int(saved.get("train_samples", 0))
        self._steps = int(saved.get("steps", 0))
        if self._train_time > 0:  # a run resumed after its last epoch trains no more: report the saved totals
            world = self.trainer.world_size if self._trainer is not None else 1
            self.stats.update(train_time_s=self._train_time,
                              samples_per_s=world * self._train_samples / self._train_time,
                              step_time_s=self._train_time / max(self._steps, 1))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.method.state_dict().items()}


_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


class _Unhandled(Exception):
    pass


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    t = type(obj)
    if t is dict:
        return {k: _to_device(v, device) for k, v in obj.items()}
    if t is list:
        return [_to_device(v, device) for v in obj]
    if t is tuple:
        return tuple(_to_device(v, device) for v in obj)
    if t in _PLAIN_TYPES:
        return obj
    raise _Unhandled  # namedtuples, dataclasses, custom batch classes: Lightning's generic walk


# method.optim.name -> optimizer class (also the valid choices checked at compose time)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def constant_warmup_lambda(kind: str, epochs: int, warmup_epochs: int, warmup_ratio: float,
                           min_ratio: float = 0.0):
    """Per-epoch multiplier of Dassl's ``ConstantWarmupScheduler`` (``optim.warmup_type: constant``),
    the schedule of the official CoOp runs (KaiyangZhou/Dassl.pytorch ``dassl/optim/lr_scheduler.py``
    ConstantWarmupScheduler + ``build_lr_scheduler``; CoOp ``configs/trainers/CoOp/vit_b16.yaml``):
    ``warmup_lr`` (``warmup_ratio * lr``) through the first ``warmup_epochs`` epochs, then the
    successor schedule started afresh (Dassl's ``WARMUP_RECOUNT=True``): cosine over ``epochs``
    epochs, ``CosineAnnealingLR(T_max=epochs)``, so epoch ``e >= W`` runs at the cosine of ``e - W``."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown scheduler {kind!r}; valid: cosine, constant")

    def fn(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_ratio
        if kind == "constant":
            return 1.0
        t = (epoch - warmup_epochs) / max(epochs, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return fn


def lr_lambda(kind: str, total: int, warmup: int, min_ratio: float = 0.0):
    """Per-step multiplier: linear warm-up then cosine (or constant) decay."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown scheduler {kind!r}; valid: cosine, constant")

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        t = (step - warmup) / max(total - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return fn
