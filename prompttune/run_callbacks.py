"""The Lightning callbacks and logger one ``fit`` run uses (see :mod:`prompttune.runs`).

* :class:`LastCheckpoint` -- ``checkpoints/last.ckpt`` at the end of every *completed* epoch,
  written atomically; an epoch cut short by an interrupt is not saved, so a resumed run
  restarts that epoch from its beginning and trains exactly as an uninterrupted one.
* :class:`ModelSelection` -- ``select: val | test``: after each evaluation, keep the best
  trainable state so far (in memory, in ``checkpoints/best.ckpt`` and in ``last.ckpt``'s
  callback state, so a resumed run keeps its best epoch).
* :class:`EpochLines` -- one log line per epoch when there is no progress bar.
* :class:`ResumableCSVLogger` -- Lightning's CSV logger, but a resumed run appends to the
  existing ``metrics.csv`` (same header, widened if new columns appear) instead of deleting it.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

progress_log = logging.getLogger("prompttune.progress")


def epoch_completed(trainer) -> bool:
    """Whether the training epoch now ending ran all its batches (not stopped by an interrupt)."""
    if getattr(trainer.lightning_module, "fused_epoch_incomplete", False):  # a fused epoch cut short
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class LastCheckpoint(L.Callback):
    """Write ``last.ckpt`` at the end of every completed training epoch, atomically (temp file +
    rename), so that a run killed at any moment leaves either the previous or the new checkpoint."""

    def __init__(self, path: Path, interrupted: Callable[[], bool] = lambda: False):
        self.path = Path(path)
        self.interrupted = interrupted

    def on_train_epoch_end(self, trainer, pl_module):
        if self.interrupted() and not epoch_completed(trainer):
            return  # a partial epoch: keep the previous epoch's checkpoint (exact resume)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp)  # every rank takes part (sharded strategies); rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("last_checkpoint")


class ModelSelection(L.Callback):
    """Track ``key`` (e.g. ``val/acc``) after every evaluation during ``fit`` and keep the trainable
    state of the best epoch (strictly better than all earlier ones, so ties keep the earliest)."""

    def __init__(self, key: str, mode: str, best_path: Path | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
        self.key, self.mode, self.best_path = key, mode, best_path
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.key not in metrics:
            from prompttune.config import ConfigError

            logged = sorted(k for k in metrics if k.split("/")[0] == self.key.split("/")[0])
            raise ConfigError(f"select_metric: {self.key!r} was not computed by this task; "
                              f"it computes: {', '.join(logged) or 'nothing on this split'}")
        value = float(metrics[self.key])
        if self._better(value):
            self.best, self.best_epoch = value, int(trainer.current_epoch)
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.method.state_dict().items()}
            if self.best_path is not None and trainer.is_global_zero:
                _atomic_torch_save({"state_dict": {f"method.{k}": v for k, v in self.best_state.items()},
                                       "epoch": self.best_epoch, "select_metric": self.key,
                                       "score": self.best}, self.best_path)

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("key") == self.key and state.get("mode") == self.mode:
            self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
            self.best_state = state.get("best_state")


class EpochLines(L.Callback):
    """``epoch k/N  loss ...  <metric> ...  <elapsed> s`` once per epoch (logs without a progress bar)."""

    def __init__(self, max_epochs: int):
        self.max_epochs = max_epochs
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        parts = [f"epoch {trainer.current_epoch + 1}/{self.max_epochs}"]
        for k, v in sorted(trainer.callback_metrics.items()):
            if k == "train/loss" or k.startswith(("val/", "test/")):
                parts.append(f"{k.removeprefix('train/')} {float(v):.4f}")
        parts.append(f"{time.perf_counter() - self.t0:.1f} s")
        progress_log.info("  ".join(parts))


# --------------------------------------------------------------------------- CSV history
class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``: its header becomes the starting column list, new rows are
    appended, and a new column rewrites the file once with the widened header (old rows kept)."""

    def _check_log_dir_exists(self) -> None:  # Lightning's version deletes the earlier history
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = list(header)


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_metrics_after(csv_path: Path, epoch: int) -> int:
    """Drop the rows an interrupted run logged after the checkpoint it resumes from (the part of
    the epoch that will be trained again); returns how many were dropped."""
    if not csv_path.is_file():
        return 0
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames or [], list(reader)

    def after(row: dict) -> bool:
        try:
            return row.get("epoch") not in (None, "") and int(float(row["epoch"])) > epoch
        except ValueError:
            return False

    keep = [r for r in rows if not after(r)]
    if len(keep) == len(rows):
        return 0
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, csv_path)
    return len(rows) - len(keep)
