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
from typing import Any

import lightning as L
import torch
from torch import nn

from prompttune.utils import count_params, peak_memory_mb


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

    def clear(self) -> None:
        self.store.clear()


class PromptTuningModule(L.LightningModule):
    def __init__(self, backbone: nn.Module, method: nn.Module, task: nn.Module,
                 optim: dict[str, Any] | None = None, cache_features: bool = True):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.task = task
        self.optim_cfg = dict(optim or {})
        self.cache_features = cache_features and method.consumes == "image_features"
        self.feature_cache = FeatureCache()
        self.automatic_optimization = not method.manual_optimization
        # checkpoints hold only the method's state; loading must not demand backbone keys
        self.strict_loading = False
        self.stats: dict[str, float] = {}
        self._train_samples = 0
        self._train_time = 0.0
        self._steps = 0
        self.assert_only_method_trains()

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
        if logging_step:  # Lightning's log() costs ~0.5 ms; the CSV logger only writes on these steps
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=self._batch_size(batch))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        outputs = self(batch, stage)
        self.task.update(outputs, batch, stage)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        metrics = self.task.compute(stage)
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, sync_dist=False)
        self.task.reset(stage)

    def on_validation_epoch_end(self):
        self._log_metrics("val")

    def on_test_epoch_end(self):
        self._log_metrics("test")

    # ------------------------------------------------------------------ timing / stats
    def on_train_start(self):
        self.assert_only_method_trains()
        self.log_dict({"params/trainable": float(self.trainable_params),
                       "params/total": float(self.total_params)}, rank_zero_only=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_epoch_start(self):
        self._epoch_t0 = time.perf_counter()
        self._epoch_samples = 0

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
        dt = time.perf_counter() - self._epoch_t0
        self._train_time += dt
        self._train_samples += self._epoch_samples
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
        if name == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
        elif name == "adam":
            opt = torch.optim.Adam(groups, lr=lr, weight_decay=wd)
        elif name == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
        else:
            raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam, adamw")
        if self.method.manual_optimization:
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        warmup = int(round(float(cfg.get("warmup_epochs", 0)) * total / epochs))
        sched = str(cfg.get("scheduler", "cosine"))
        min_ratio = float(cfg.get("min_lr", 0.0)) / lr if lr > 0 else 0.0
        fn = lr_lambda(sched, total, warmup, min_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("method.")}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.method.state_dict().items()}


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
