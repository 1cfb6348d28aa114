"""One run: config -> components -> Lightning fit/test -> run directory with ``result.json``.

The run directory holds ``config.yaml`` (resolved), ``result.json`` (written atomically,
last), ``checkpoints/`` (trainable state only; ``last.ckpt`` is what an interrupted run
resumes from) and ``logs/`` (CSV always, W&B when enabled).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prompttune import __version__
from prompttune.config import ConfigError, to_container
from prompttune.registry import BACKBONES, DATASETS, METHODS, TASKS
from prompttune.utils import atomic_write_json, atomic_write_text
from prompttune.wandb_utils import finish_active_run

log = logging.getLogger("prompttune")

_NOT_KWARGS = {"method": ("name", "uses", "optim", "cache_features"), "backbone": ("name",),
               "data": ("name",), "task": ("name",)}


def kwargs_of(cfg: DictConfig, group: str) -> dict[str, Any]:
    node = to_container(cfg[group])
    return {k: v for k, v in node.items() if k not in _NOT_KWARGS[group]}


# --------------------------------------------------------------------------- identity
# Keys that name, place, log or pace a run but cannot change its result: left out of its identity.
NOT_IDENTITY = ("run_dir", "run_name", "runs_root", "resume", "wandb", "tags", "experiment", "protocol",
                "features")  # the feature store changes where features come from, not what they are
NOT_IDENTITY_NESTED = {"trainer": ("enable_progress_bar", "log_every_n_steps", "cpu_threads"),
                       "data": ("num_workers",)}


def _portable(value: Any) -> Any:
    """Paths under this machine's cache or checkout written as ``${cache:}``/``${repo:}``, so the same
    config has the same identity on every machine sharing a runs directory."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str):
        from prompttune.config import cache_dir, repo_root

        for root, tag in ((str(cache_dir()), "${cache:}"), (str(repo_root()), "${repo:}")):
            if value == root or value.startswith(root + os.sep):
                return tag + value[len(root):]
    return value


def identity(cfg: DictConfig | dict, drop_seed: bool = False) -> dict[str, Any]:
    """What makes a run's result what it is: the resolved config without the keys in
    :data:`NOT_IDENTITY` (and without ``seed`` for grouping seeds of one setting, as ``report`` does)."""
    c = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    for k in NOT_IDENTITY + (("seed",) if drop_seed else ()):
        c.pop(k, None)
    for group, keys in NOT_IDENTITY_NESTED.items():
        if isinstance(c.get(group), dict):
            c[group] = {k: v for k, v in c[group].items() if k not in keys}
    return _portable(c)


def config_hash(cfg: DictConfig | dict, drop_seed: bool = False, length: int = 8) -> str:
    """A short, stable hash of :func:`identity` (sha256 of its canonical JSON)."""
    text = json.dumps(identity(cfg, drop_seed=drop_seed), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def identity_diff(old: dict, new: dict, limit: int = 4) -> str:
    """``key: old -> new`` for the first keys where two identities differ."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    a, b = flat(old), flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    shown = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    return "; ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def run_name(cfg: DictConfig) -> str:
    if cfg.get("run_name"):
        return str(cfg.run_name)
    c = cfg.choices
    return f"{c.method}-{c.data}-{c.backbone}-s{cfg.seed}-{config_hash(cfg)}"


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

    # frozen features are cacheable only when they are a function of the image: no augmentation,
    # and no stochastic depth in the frozen backbone (SPT's drop_path runs in training mode)
    random_features = bool(cfg.data.get("augment", False)) or float(cfg.backbone.get("drop_path_rate") or 0) > 0
    cache = bool(cfg.method.get("cache_features", True)) and not random_features
    feats = cfg.get("features") or {}
    return PromptTuningModule(backbone, method, task, optim=to_container(cfg.method.optim), cache_features=cache,
                              feature_store=bool(feats.get("store", True)), fused_epochs=bool(feats.get("fused_epochs", True)))


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
    if t.get("enable_progress_bar") is None:  # null: Lightning's bar on a terminal, epoch lines in logs
        kw["enable_progress_bar"] = sys.stdout.isatty()
    return kw


# --------------------------------------------------------------------------- model selection
SELECT_SPLIT = {"last": None, "val": "val", "test": "test"}


def selection(cfg: DictConfig, task=None) -> tuple[str, str | None, str]:
    """``(select, metric key, mode)``: e.g. ``("val", "val/acc", "max")``; the key is None for ``last``.

    ``select_metric`` may be a bare name (``acc``) or carry the split that ``select`` evaluates
    (``val/acc`` for ``select: val``); null means the task's own ``monitor`` metric."""
    select = str(cfg.get("select") or "last")
    if select not in SELECT_SPLIT:
        raise ConfigError(f"select={select!r}: expected one of {', '.join(SELECT_SPLIT)}")
    mode = str(cfg.get("select_mode") or "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"select_mode={mode!r}: expected max or min")
    split = SELECT_SPLIT[select]
    name = cfg.get("select_metric")
    if split is None:
        return select, None, mode
    if name is None:
        name = getattr(task, "monitor", None) if task is not None else None
        if name is None:
            return select, None, mode  # known once the task is built
    name = str(name)
    if "/" in name:
        prefix, bare = name.split("/", 1)
        if prefix != split:
            raise ConfigError(f"select_metric={name!r} names the {prefix!r} split, but select={select!r} selects on "
                              f"the {split!r} split; write {bare!r} or '{split}/{bare}'")
        name = bare
    return select, f"{split}/{name}", mode


def _check_val_split(cfg: DictConfig, dm) -> None:
    if str(cfg.get("select") or "last") != "val":
        return
    if hasattr(dm, "datasets") and not dm.datasets and hasattr(dm, "setup"):
        dm.setup("fit")
    splits = getattr(dm, "datasets", None)
    if isinstance(splits, dict) and not splits.get("val"):
        raise ConfigError(f"select='val' needs a validation split, but data {cfg.choices.data!r} has none "
                          f"(it has: {', '.join(k for k, v in splits.items() if v) or 'nothing'}); "
                          "use select=last, select=test (the official protocol of some papers), or data with a val split")


# --------------------------------------------------------------------------- run directory
def is_rank_zero() -> bool:
    """Rank 0 of a (possibly multi-process) run, from the variables Lightning, torchrun and SLURM set;
    known before any Trainer exists, so that only rank 0 prepares and writes the run directory."""
    return all(int(os.environ.get(v) or 0) == 0
               for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"))


def check_writable_dir(path: Path, role: str = "run_dir") -> None:
    """Fail fast, naming the path and its role, if ``path`` cannot be a writable folder: below a
    file, on a read-only filesystem, in a virtual filesystem (/proc, /sys), without permission."""
    target = Path(path).expanduser().absolute()
    anc = target
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        what = "is a file" if anc.exists() else "is not a folder"
        raise ConfigError(f"{role} {target}: {anc} {what}; choose another {role}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".prompttune-probe-", dir=anc))
    except OSError as err:
        raise ConfigError(f"{role} {target} cannot be written: creating a folder in {anc} failed "
                          f"({err.strerror or err}); choose another {role}") from None


def _stored_identity(rdir: Path) -> dict | None:
    f = rdir / "config.yaml"
    if not f.is_file():
        return None
    try:
        return identity(OmegaConf.to_container(OmegaConf.load(f), resolve=True))
    except Exception:  # unreadable or unresolvable: not a config we can compare with
        return None


def _discard_run(rdir: Path) -> None:
    """Remove what an earlier run left (record, checkpoints, CSV history); config.yaml is rewritten next."""
    for f in [rdir / "result.json", rdir / "logs" / "metrics.csv", *(rdir / "checkpoints").glob("*.ckpt"),
              *rdir.glob("hpc_ckpt_*.ckpt")]:
        if f.is_file():
            f.unlink()


def _decide(cfg: DictConfig, rdir: Path, force: bool) -> tuple[str, dict | None]:
    """What to do with ``rdir``: ``("done", record)``, ``("resume", None)`` or ``("replace", None)``
    (start over, removing what an earlier run left there)."""
    record = read_result(rdir)
    old = _stored_identity(rdir)
    same = old is not None and old == identity(cfg)
    status = (record or {}).get("status")
    if force:
        return "replace", None
    if status == "completed":
        if same:
            return "done", record
        detail = identity_diff(old, identity(cfg)) if old is not None else "its config.yaml is missing or unreadable"
        raise ConfigError(f"run_dir {rdir} holds a completed run with a different config ({detail}); "
                          "use --force to replace it, or choose another run_dir")
    if old is None:  # nothing comparable: whatever an earlier run left there is not this run's
        return "replace", None
    if same:
        return ("resume" if cfg.get("resume", True) else "replace"), None
    last = rdir / "checkpoints" / "last.ckpt"
    if last.is_file() and status != "failed":
        raise ConfigError(f"run_dir {rdir} holds an interrupted run with a different config "
                          f"({identity_diff(old, identity(cfg))}) and a checkpoint ({last}); rerun the same config "
                          "to resume it, use --force to discard it, or choose another run_dir")
    log.warning("%s: replacing an unfinished run with a different config (%s) that left no checkpoint to resume",
                rdir, "it failed" if status == "failed" else "no checkpoint")
    return "replace", None


def prepare_run_dir(cfg: DictConfig, rdir: Path | None = None, discard: bool = False) -> Path:
    """Create ``rdir`` and write the resolved ``config.yaml``: called once the run is about to train,
    so a config that fails earlier leaves nothing that could block its corrected rerun."""
    rdir = Path(rdir) if rdir is not None else run_dir(cfg)
    try:
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "checkpoints").mkdir(exist_ok=True)
        if discard:
            _discard_run(rdir)
        record = read_result(rdir)
        if record and record.get("status") == "failed":
            (rdir / "result.json").unlink()  # this attempt replaces the failed one
        atomic_write_text(rdir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    except OSError as err:
        raise ConfigError(f"run_dir {rdir} cannot be written: {err.strerror or err} ({err.filename or rdir})") from None
    return rdir


# --------------------------------------------------------------------------- checkpoints
def usable_checkpoint(path: Path) -> dict | None:
    """The checkpoint's contents if it loads weights-only; a corrupt one is set aside (renamed), not trusted."""
    if not path.is_file():
        return None
    from prompttune.utils import torch_load_trusted

    try:
        state = torch_load_trusted(path)
        ok = isinstance(state, dict) and "state_dict" in state
    except ValueError:
        ok = False
    if not ok:
        bad = path.with_name(path.name + ".corrupt")
        if is_rank_zero():
            os.replace(path, bad)
        log.warning("%s is unreadable; set aside as %s and starting from scratch", path, bad.name)
        return None
    return state


def check_checkpoint_fits(state: dict, method, path: Path, cfg: DictConfig, role: str = "checkpoint") -> dict:
    """The method's own tensors of a checkpoint, after checking that they fit the method as configured
    (same names, same shapes); otherwise a ConfigError says what the file holds and what is expected."""
    state = state.get("state_dict", state)
    own = {k.removeprefix("method."): v for k, v in state.items() if k.startswith("method.")}
    expected = method.state_dict()
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}

    def shape(t) -> str:
        return "x".join(map(str, getattr(t, "shape", ()))) or "scalar"

    wrong = [f"{k} {shape(v)} (expected {shape(expected[k])})" for k, v in own.items()
             if k in expected and tuple(getattr(v, "shape", ())) != tuple(expected[k].shape)]
    unknown = [k for k in own if k not in expected]
    missing = sorted(trainable - set(own))
    if wrong or unknown or missing:
        holds = ", ".join(f"{k} {shape(v)}" for k, v in list(own.items())[:4]) or "no method tensors"
        wants = ", ".join(f"{k} {shape(expected[k])}" for k in sorted(trainable)[:4])
        problems = "; ".join(filter(None, [
            f"wrong shape: {', '.join(wrong[:3])}" if wrong else "",
            f"not in the method: {', '.join(unknown[:3])}" if unknown else "",
            f"missing: {', '.join(missing[:3])}" if missing else ""]))
        raise ConfigError(f"{role} {path} does not fit method {cfg.choices.method!r} as configured ({problems}): "
                          f"it holds {holds}; the method expects {wants}")
    return own


# --------------------------------------------------------------------------- interrupts
class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; ``exit_code`` is the shell convention 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint = int(signum), checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Interrupts:
    """SIGINT and SIGTERM while a run is in this process: the first one asks Lightning to stop after
    the current batch (``trainer.should_stop``; for SIGTERM Lightning's own handler does the same and
    raises ``SIGTERMException``), so the last completed epoch's checkpoint stays the resume point;
    a second one, or one outside training, stops at once. Lightning composes its SIGTERM handler
    (and, under SLURM with auto-requeue, its SIGUSR1 requeue handler) with this one, so both run."""

    def __init__(self):
        self.signum: int | None = None
        self.trainer = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.trainer is None or not first:
            raise RunInterrupted(self.signum)
        log.warning("received %s: stopping after the current batch (send it again to stop at once)",
                    signal.Signals(signum).name)
        self.trainer.should_stop = True


def _last_checkpoint_callback(path: Path, interrupted=lambda: False):
    from prompttune.run_callbacks import LastCheckpoint

    return LastCheckpoint(path, interrupted)


def make_trainer(cfg: DictConfig, rdir: Path, max_epochs: int, loggers: list, callbacks: list | None = None,
                 last_checkpoint: bool = True, interrupted=lambda: False, **overrides):
    import lightning as L

    from prompttune.run_callbacks import EpochLines

    callbacks = list(callbacks or [])
    if last_checkpoint:
        (rdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        callbacks.insert(0, _last_checkpoint_callback(rdir / "checkpoints" / "last.ckpt", interrupted))
    kw = {**trainer_kwargs(cfg), **overrides}
    if not kw.get("enable_progress_bar") and max_epochs > 0:
        callbacks.append(EpochLines(max_epochs))
    return L.Trainer(max_epochs=max_epochs, logger=loggers, callbacks=callbacks, enable_checkpointing=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(rdir), **kw)


def _selection_overrides(cfg: DictConfig, select: str) -> dict[str, Any]:
    """Evaluate every epoch on the split that ``select`` names, in full unless a limit is set."""
    if select == "val":
        limit = cfg.trainer.get("limit_val_batches")
        return {"limit_val_batches": None if limit in (0, 0.0) else limit, "check_val_every_n_epoch": 1}
    if select == "test":  # the per-epoch evaluation *is* the test set: same limit as the final test
        return {"limit_val_batches": cfg.trainer.get("limit_test_batches"), "check_val_every_n_epoch": 1}
    return {}


# --------------------------------------------------------------------------- running
def _failed_record(cfg: DictConfig, err: BaseException) -> dict[str, Any]:
    import traceback

    return {"status": "failed", "method": cfg.choices.method, "backbone": cfg.choices.backbone,
            "data": cfg.choices.data, "seed": int(cfg.seed), "run_name": run_name(cfg),
            "config_hash": config_hash(cfg), "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=20),
            "tags": to_container(cfg.tags) if cfg.get("tags") else {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def fit(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Train and evaluate one run; returns its record (also written to result.json).

    A completed run with the same config is returned as it is; an interrupted one resumes from
    ``checkpoints/last.ckpt``. SIGINT/SIGTERM raise :class:`RunInterrupted` (no record is written);
    any other error after the run directory is prepared writes a ``status: failed`` record."""
    rdir = run_dir(cfg)
    rank0 = is_rank_zero()
    check_writable_dir(rdir, "run_dir")
    selection(cfg)  # a select_metric naming the other split fails here, before anything is built
    action, record = _decide(cfg, rdir, force)
    if action == "done":
        log.info("%s: already completed with this config; skipping (use --force to rerun)", rdir)
        return record
    t_start = time.perf_counter()
    with _Interrupts() as interrupts:
        backbone, dm, method, task = build(cfg)  # every check that can fail on input runs here
        _check_val_split(cfg, dm)
        select, select_key, select_mode = selection(cfg, task)
        module = make_module(cfg, backbone, method, task)
        if rank0:
            prepare_run_dir(cfg, rdir, discard=(action == "replace"))
        try:
            return _train_and_test(cfg, rdir, dm, backbone, module, interrupts, t_start,
                                   (select, select_key, select_mode))
        except RunInterrupted as err:
            err.checkpoint = rdir / "checkpoints" / "last.ckpt"
            finish_active_run(exit_code=err.exit_code, status="interrupted")
            raise
        except SystemExit as err:  # Lightning ends SIGTERM (SIGTERMException) and Ctrl-C (exit 1) this way
            if interrupts.signum is not None:
                finish_active_run(exit_code=128 + interrupts.signum, status="interrupted")
                raise RunInterrupted(interrupts.signum, rdir / "checkpoints" / "last.ckpt") from None
            raise
        except Exception as err:
            if rank0:
                atomic_write_json(rdir / "result.json", _failed_record(cfg, err))
            finish_active_run(exit_code=1, status="failed", error=f"{type(err).__name__}: {err}")  # W&B: failed
            raise


def _train_and_test(cfg, rdir, dm, backbone, module, interrupts, t_start, sel) -> dict[str, Any]:
    from prompttune.run_callbacks import ModelSelection, ResumableCSVLogger, trim_metrics_after
    from prompttune.wandb_utils import make_wandb_logger

    select, select_key, select_mode = sel
    rank0 = is_rank_zero()
    epochs = int(cfg.method.optim.epochs)
    trains = epochs > 0 and module.trainable_params > 0
    last = rdir / "checkpoints" / "last.ckpt"
    ckpt_path = None
    resumed_epoch = None
    if trains and cfg.get("resume", True):
        state = usable_checkpoint(last)
        if state is not None:
            check_checkpoint_fits(state, module.method, last, cfg, role="the checkpoint to resume from")
            ckpt_path, resumed_epoch = str(last), int(state.get("epoch", -1))
            if rank0:
                trim_metrics_after(rdir / "logs" / "metrics.csv", resumed_epoch)
            log.warning("%s: resuming from %s (%d of %d epochs done)", rdir, last, resumed_epoch + 1, epochs)
    loggers = [ResumableCSVLogger(str(rdir), name="logs", version="")]
    wb = make_wandb_logger(cfg, rdir, run_name(cfg))
    if wb is not None:
        loggers.append(wb)
    selector = None
    callbacks = []
    if trains and select != "last":
        selector = ModelSelection(select_key, select_mode, rdir / "checkpoints" / "best.ckpt")
        callbacks.append(selector)
        if select == "test":  # the official SPT/VPT/InMeMo protocol: evaluate the test split every epoch
            module.val_stage = "test"
            dm.val_dataloader = dm.test_dataloader
    trainer = make_trainer(cfg, rdir, max(epochs, 1) if trains else 0, loggers, callbacks,
                           interrupted=lambda: interrupts.signum is not None,
                           **(_selection_overrides(cfg, select) if selector else {}))
    interrupts.trainer = trainer
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        if trains:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
            if interrupts.signum is not None:
                raise RunInterrupted(interrupts.signum)
            if selector is not None and selector.best_state is not None:
                module.method.load_state_dict(selector.best_state)
            _drop_hpc_checkpoints(rdir, trainer)
        module.val_stage = "val"
        tested = trainer.test(module, datamodule=dm, verbose=False)
    if interrupts.signum is not None:
        raise RunInterrupted(interrupts.signum)
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    if not trainer.is_global_zero:
        return {}
    stats = module.stats
    best_epoch = None
    if trains:
        best_epoch = selector.best_epoch if selector is not None else int(trainer.current_epoch) - 1
    result = {
        "status": "completed",
        "method": cfg.choices.method,
        "backbone": cfg.choices.backbone,
        "backbone_name": getattr(backbone, "name", ""),
        # what the weights are and what that implies (ViT: pooling and why, normalisation, drop-path)
        "backbone_record": backbone.record() if hasattr(backbone, "record") else None,
        "data": cfg.choices.data,
        # what the data really was where it differs from the config (few-shot: the shots per class used)
        "data_record": dm.record() if hasattr(dm, "record") else None,
        "task": cfg.choices.task,
        "seed": int(cfg.seed),
        "metrics": metrics,
        "select": select,
        "select_metric": select_key,
        "select_mode": select_mode if select != "last" else None,
        "select_score": selector.best if selector is not None else None,
        "best_epoch": best_epoch,  # 0-based, as the epoch column of logs/metrics.csv
        "protocol": to_container(cfg.protocol) if cfg.get("protocol") else None,
        "config_hash": config_hash(cfg),
        "trainable_params": module.trainable_params,
        "total_params": module.total_params,
        "train_time_s": round(stats.get("train_time_s", 0.0), 3),
        "samples_per_s": round(stats.get("samples_per_s", 0.0), 2),
        "step_time_s": round(stats.get("step_time_s", 0.0), 5),
        "peak_mem_mb": round(module.peak_mem_mb, 1),
        # frozen features read from (hit) or written to the on-disk store, per split, with the seconds spent
        "feature_store": getattr(module, "feature_store_log", None) or None,
        "epochs": epochs if trains else 0,
        "resumed_from_epoch": resumed_epoch,
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
    items = getattr(module, "test_items", None)
    if items:  # each test item's score, for paired CIs between methods (prompttune.stats)
        atomic_write_json(rdir / "test_items.json", {"split": "test", **items})
        result["test_items"] = "test_items.json"
    atomic_write_json(rdir / "result.json", result)  # last: only a finished run has a record
    from prompttune.wandb_utils import finish_wandb

    finish_wandb(wb, result, failed=False)  # summary = metrics + costs; one W&B run per run, finished here
    return result


def _drop_hpc_checkpoints(rdir: Path, trainer) -> None:
    """Training is over: Lightning's SLURM requeue checkpoints (``hpc_ckpt_*.ckpt``) are stale, and
    under SLURM ``trainer.test`` would otherwise load the newest one over the selected weights."""
    stale = sorted(rdir.glob("hpc_ckpt_*.ckpt"))
    if not stale:
        return
    if trainer.is_global_zero:
        for f in stale:
            f.unlink(missing_ok=True)
    trainer.strategy.barrier("drop_hpc_checkpoints")


def default_checkpoint(rdir: Path) -> Path:
    """The state a run reported: ``best.ckpt`` when it selected an epoch (select: val|test), else ``last.ckpt``."""
    record = read_result(rdir) or {}
    best = rdir / "checkpoints" / "best.ckpt"
    if record.get("select") in ("val", "test") and best.is_file():
        return best
    return rdir / "checkpoints" / "last.ckpt"


def evaluate(cfg: DictConfig, checkpoint: str | None = None) -> dict[str, float]:
    """Test a trained method (its checkpoint holds only the method's state) on the test split."""
    from prompttune.utils import torch_load_trusted

    path = Path(checkpoint) if checkpoint else default_checkpoint(run_dir(cfg))
    if checkpoint and not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: " + ("is a folder, not a file" if path.is_dir() else "not found"))
    backbone, dm, method, task = build(cfg)
    module = make_module(cfg, backbone, method, task)
    if path.is_file():
        try:
            state = torch_load_trusted(path)
        except ValueError as err:
            raise ConfigError(f"checkpoint {path}: {err}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
        own = check_checkpoint_fits(state, method, path, cfg)
        method.load_state_dict(own, strict=False)
    elif module.trainable_params:
        raise FileNotFoundError(f"checkpoint not found: {path} (train the run first, or pass --checkpoint)")
    trainer = make_trainer(cfg, Path(tempfile.gettempdir()), 0, loggers=[], last_checkpoint=False)
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
