"""One run: config -> components -> Lightning fit/test -> run directory with ``result.json``.

The run directory holds ``config.yaml`` (resolved), ``result.json`` (written atomically,
last), ``checkpoints/`` (trainable state only; ``last.ckpt`` is what an interrupted run
resumes from) and ``logs/`` (CSV always, W&B when enabled).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prompttune import __version__
from prompttune.config import ConfigError, to_container
from prompttune.registry import BACKBONES, DATASETS, METHODS, TASKS
from prompttune.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("prompttune")

_NOT_KWARGS = {"method": ("name", "uses", "optim", "cache_features"), "backbone": ("name",),
               "data": ("name",), "task": ("name",)}


def kwargs_of(cfg: DictConfig, group: str) -> dict[str, Any]:
    node = to_container(cfg[group])
    return {k: v for k, v in node.items() if k not in _NOT_KWARGS[group]}


def run_name(cfg: DictConfig) -> str:
    if cfg.get("run_name"):
        return str(cfg.run_name)
    c = cfg.choices
    return f"{c.method}-{c.data}-{c.backbone}-s{cfg.seed}"


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) if cfg.get("run_dir") else Path(cfg.runs_root) / run_name(cfg)


def read_result(path: Path) -> dict | None:
    """A run's record, or None if absent or unreadable (a crash mid-write cannot produce one)."""
    f = Path(path) / "result.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def is_completed(path: Path) -> bool:
    res = read_result(path)
    return bool(res) and res.get("status") == "completed"


# --------------------------------------------------------------------------- building
def build_backbone(cfg: DictConfig):
    return BACKBONES.get(cfg.backbone.name)(**kwargs_of(cfg, "backbone"))


def build_datamodule(cfg: DictConfig, backbone=None):
    dm = DATASETS.get(cfg.data.name)(seed=int(cfg.seed), **kwargs_of(cfg, "data"))
    if backbone is not None:
        dm.configure_for(backbone)
    dm.check()  # layout, split files, missing images: fail before any compute
    return dm


def build_method(cfg: DictConfig):
    return METHODS.get(cfg.method.name)(**kwargs_of(cfg, "method"))


def build_task(cfg: DictConfig, info: dict):
    return TASKS.get(cfg.task.name)(info=info, **kwargs_of(cfg, "task"))


def check_compatible(cfg: DictConfig, method_cls, backbone) -> None:
    want = getattr(method_cls, "backbone_kind", None)
    if want is not None and not isinstance(backbone, want):
        names = want.__name__ if isinstance(want, type) else ", ".join(w.__name__ for w in want)
        raise ConfigError(
            f"method {cfg.method.name!r} needs a {names} backbone, but backbone {cfg.choices.backbone!r} "
            f"is a {type(backbone).__name__}"
        )


def build(cfg: DictConfig):
    """Backbone, datamodule, method (set up) and task, validated in that order."""
    import lightning as L
    import torch

    if cfg.trainer.get("cpu_threads"):
        torch.set_num_threads(int(cfg.trainer.cpu_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    method_cls = METHODS.get(cfg.method.name)
    backbone = build_backbone(cfg)
    check_compatible(cfg, method_cls, backbone)
    dm = build_datamodule(cfg, backbone)
    method = build_method(cfg)
    method.setup(backbone, dm)
    task = build_task(cfg, dm.info())
    return backbone, dm, method, task


def make_module(cfg: DictConfig, backbone, method, task):
    from prompttune.module import PromptTuningModule

    cache = bool(cfg.method.get("cache_features", True)) and not bool(cfg.data.get("augment", False))
    return PromptTuningModule(backbone, method, task, optim=to_container(cfg.method.optim), cache_features=cache)


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    import torch

    t = to_container(cfg.trainer)
    t.pop("cpu_threads", None)
    precision = t.pop("precision")
    accel = t.get("accelerator", "cpu")
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if precision == "auto":
        precision = "bf16-mixed" if on_gpu else "32-true"
    if on_gpu and not torch.cuda.is_available():
        raise ConfigError(f"trainer {cfg.choices.trainer!r} asks for a GPU, but CUDA is not available; use trainer=cpu")
    kw = {k: v for k, v in t.items() if v is not None}
    kw["precision"] = precision
    return kw


def _last_checkpoint_callback(path: Path):
    """Write ``last.ckpt`` at the end of every training epoch, atomically (temp file + rename),
    so that a run killed at any moment leaves either the previous or the new checkpoint."""
    import lightning as L

    class LastCheckpoint(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            tmp = path.with_name(f".{path.name}.tmp")
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                os.replace(tmp, path)
            trainer.strategy.barrier("last_checkpoint")

    return LastCheckpoint()


def usable_checkpoint(path: Path) -> bool:
    """A checkpoint that loads weights-only; a corrupt one is set aside (renamed), not trusted."""
    if not path.is_file():
        return False
    from prompttune.utils import torch_load_trusted

    try:
        state = torch_load_trusted(path)
        ok = isinstance(state, dict) and "state_dict" in state
    except ValueError:
        ok = False
    if not ok:
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        log.warning("%s is unreadable; set aside as %s and starting from scratch", path, bad.name)
    return ok


def make_trainer(cfg: DictConfig, rdir: Path, max_epochs: int, loggers: list, callbacks: list | None = None):
    import lightning as L

    (rdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt = _last_checkpoint_callback(rdir / "checkpoints" / "last.ckpt")
    return L.Trainer(max_epochs=max_epochs, logger=loggers, callbacks=[ckpt, *(callbacks or [])],
                     enable_checkpointing=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(rdir),
                     **trainer_kwargs(cfg))


# --------------------------------------------------------------------------- running
def prepare_run_dir(cfg: DictConfig) -> Path:
    rdir = run_dir(cfg)
    rdir.mkdir(parents=True, exist_ok=True)
    cfg_file = rdir / "config.yaml"
    new = OmegaConf.to_yaml(cfg, resolve=True)
    if cfg_file.is_file() and not is_completed(rdir):
        old = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
        if _comparable(old) != _comparable(to_container(cfg)):
            raise ConfigError(
                f"{rdir} holds an unfinished run with a different config; resume it with the same settings, "
                "or choose another run_dir"
            )
    atomic_write_text(cfg_file, new)
    return rdir


def _comparable(c: dict) -> dict:
    c = dict(c)
    for k in ("resume", "wandb", "run_dir", "runs_root"):
        c.pop(k, None)
    t = dict(c.get("trainer") or {})
    t.pop("enable_progress_bar", None)
    c["trainer"] = t
    return c


def fit(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Train and evaluate one run; returns its record (also written to result.json)."""
    rdir = run_dir(cfg)
    if is_completed(rdir) and not force:
        log.info("%s: already completed; skipping (use --force to rerun)", rdir)
        return read_result(rdir)
    if force and (rdir / "result.json").exists():
        (rdir / "result.json").unlink()
        last = rdir / "checkpoints" / "last.ckpt"
        if last.exists():
            last.unlink()
    t_start = time.perf_counter()
    backbone, dm, method, task = build(cfg)  # every check that can fail on input runs here
    rdir = prepare_run_dir(cfg)
    module = make_module(cfg, backbone, method, task)

    from lightning.pytorch.loggers import CSVLogger

    from prompttune.wandb_utils import make_wandb_logger

    loggers = [CSVLogger(str(rdir), name="logs", version="")]
    wb = make_wandb_logger(cfg, rdir, run_name(cfg))
    if wb is not None:
        loggers.append(wb)
    epochs = int(cfg.method.optim.epochs)
    trains = epochs > 0 and module.trainable_params > 0
    trainer = make_trainer(cfg, rdir, max(epochs, 1) if trains else 0, loggers)
    last = rdir / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        if trains:
            ckpt_path = str(last) if (cfg.get("resume", True) and usable_checkpoint(last)) else None
            if ckpt_path:
                log.warning("%s: resuming from %s", rdir, last)
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        tested = trainer.test(module, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    if not trainer.is_global_zero:
        return {}
    stats = module.stats
    result = {
        "status": "completed",
        "method": cfg.choices.method,
        "backbone": cfg.choices.backbone,
        "backbone_name": getattr(backbone, "name", ""),
        "data": cfg.choices.data,
        "task": cfg.choices.task,
        "seed": int(cfg.seed),
        "metrics": metrics,
        "trainable_params": module.trainable_params,
        "total_params": module.total_params,
        "train_time_s": round(stats.get("train_time_s", 0.0), 3),
        "samples_per_s": round(stats.get("samples_per_s", 0.0), 2),
        "step_time_s": round(stats.get("step_time_s", 0.0), 5),
        "peak_mem_mb": round(module.peak_mem_mb, 1),
        "epochs": epochs if trains else 0,
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "tags": to_container(cfg.tags) if cfg.get("tags") else {},
        "experiment": cfg.get("experiment"),
        "run_name": run_name(cfg),
        "precision": str(trainer.precision),
        "devices": int(trainer.world_size),
        "device": str(module.device),
        "host": platform.node(),
        "prompttune_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(rdir / "result.json", result)  # last: only a finished run has a record
    if wb is not None:
        wb.experiment.summary.update({f"final/{k}": v for k, v in metrics.items()})
        wb.finalize("success")
    return result


def evaluate(cfg: DictConfig, checkpoint: str | None = None) -> dict[str, float]:
    """Test a trained method (its checkpoint holds only the method's state) on the test split."""
    from prompttune.utils import torch_load_trusted

    backbone, dm, method, task = build(cfg)
    module = make_module(cfg, backbone, method, task)
    path = Path(checkpoint) if checkpoint else run_dir(cfg) / "checkpoints" / "last.ckpt"
    if path.is_file():
        state = torch_load_trusted(path)
        state = state.get("state_dict", state)
        own = {k.removeprefix("method."): v for k, v in state.items() if k.startswith("method.")}
        missing, unexpected = method.load_state_dict(own, strict=False)
        if unexpected or [m for m in missing if m in dict(method.named_parameters())]:
            raise ConfigError(f"checkpoint {path} does not fit method {cfg.method.name!r} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    elif checkpoint or module.trainable_params:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    trainer = make_trainer(cfg, Path(cfg.get("run_dir") or "runs/_eval"), 0, loggers=[])
    tested = trainer.test(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in (tested[0] if tested else {}).items()}


def quiet_lightning() -> None:
    import lightning  # noqa: F401  (it sets its loggers' levels on import; override after)

    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
