"""Weights & Biases through Lightning's WandbLogger: one W&B run per prompttune run, never hanging.

``wandb.mode: auto`` logs online when an API key is configured and the service answers
within a few seconds, and otherwise offline (into ``<run_dir>/wandb``, syncable later with
``wandb sync``), saying why. API keys are read from the environment or netrc by wandb
itself; they are never written into configs or logs.

One W&B run per run: Lightning's ``WandbLogger`` silently *reuses* a W&B run that is still
open in the process, so a sweep that runs several fits in one process would pour every
history into the first run. :func:`make_wandb_logger` therefore finishes any run left open
before it starts a new one, and :func:`finish_wandb` (called by ``runs.fit`` when a run
ends, whether it succeeded or failed) writes the summary and finishes the run, with
``exit_code=1`` for a failed run so that W&B marks it failed.

``wandb.group`` (the sweep name + the grid point without the seed, so W&B averages seeds),
``wandb.job_type`` (default: the method) and ``wandb.tags`` are config keys, so a sweep, a
``wandb agent`` command or a plain ``fit`` can all set them.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from prompttune.config import to_container

log = logging.getLogger("prompttune")
# Exact key names (case-insensitive) whose values are masked before a config is logged.
# Exact names, not substrings: `class_token_position`, `token_reweight`, `max_new_tokens`
# and `qformer_tokenizer` are ordinary hyper-parameters and must be logged as they are.
SECRET_KEYS = frozenset({"api_key", "apikey", "wandb_api_key", "password", "passwd", "secret", "secret_key",
                         "token", "access_token", "auth_token", "hf_token"})
# costs copied from the run record into the W&B summary, beside the final metrics
SUMMARY_COSTS = ("trainable_params", "total_params", "train_time_s", "samples_per_s", "peak_mem_mb", "wall_time_s",
                 "epochs", "best_epoch", "select")
TAG_MAX = 64  # W&B rejects longer tags


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _login_ok(timeout: float) -> bool:
    result = {"ok": False}

    def attempt():
        try:
            import wandb

            result["ok"] = bool(wandb.login(verify=True, timeout=timeout))
        except Exception as err:  # bad key, no network, service down
            result["err"] = err

    th = threading.Thread(target=attempt, daemon=True)
    th.start()
    th.join(timeout)
    return result["ok"]


def resolve_mode(mode: str, timeout: float = 8.0) -> tuple[str, str]:
    if mode in ("offline", "disabled"):
        return mode, f"wandb.mode={mode}"
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return ("disabled" if os.environ["WANDB_MODE"] == "disabled" else "offline"), "WANDB_MODE in the environment"
    if not has_api_key():
        if mode == "online":
            return "offline", "no W&B API key found; logging offline instead (sync later with `wandb sync`)"
        return "offline", "no W&B API key: logging offline (sync later with `wandb sync`)"
    if not _login_ok(timeout):
        return "offline", "W&B login failed (bad key or no network); logging offline instead"
    return "online", "online"


def is_secret_key(key: Any) -> bool:
    return str(key).lower() in SECRET_KEYS


def scrub(obj):
    """Mask the values of secret-named keys (exact names, see ``SECRET_KEYS``) before a config is logged."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_key(k) and v not in (None, "") else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def run_tags(cfg: DictConfig) -> list[str]:
    """``wandb.tags``, each cut to W&B's 64-character limit, duplicates dropped."""
    out: list[str] = []
    for t in list(cfg.wandb.get("tags") or []):
        t = str(t)[:TAG_MAX]
        if t not in out:
            out.append(t)
    return out


def finish_active_run(exit_code: int = 1, status: str | None = None, error: str | None = None) -> None:
    """Finish the W&B run open in this process, if any: the run a fit that failed or was
    interrupted leaves behind (``runs.fit`` calls this on its error paths), or one a crashed
    earlier fit left open (called before a new logger, so it starts a new run instead of reusing it)."""
    import sys

    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    try:
        if status is None:
            log.warning("W&B: finishing run %s left open by an earlier run in this process", getattr(run, "id", "?"))
        else:
            run.summary.update({"status": status, **({"error": error[:500]} if error else {})})
        run.finish(exit_code=exit_code)
    except Exception as err:  # noqa: BLE001 -- never turn a logging problem into a second error
        log.warning("W&B: could not finish run: %s: %s", type(err).__name__, err)


def make_wandb_logger(cfg: DictConfig, rdir: Path, name: str):
    """A WandbLogger for one run (or None when W&B is off): its own W&B run, with the run's
    group, job type, tags and resolved config (secrets masked)."""
    if not cfg.wandb.enabled:
        return None
    from lightning.pytorch.loggers import WandbLogger

    mode, why = resolve_mode(str(cfg.wandb.mode))
    if mode == "disabled":
        return None
    if mode != "online":
        log.warning("W&B: %s", why)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    finish_active_run()
    kwargs: dict[str, Any] = {
        "project": cfg.wandb.project, "entity": cfg.wandb.entity, "name": name, "save_dir": str(rdir), "mode": mode,
        "tags": run_tags(cfg), "config": scrub(to_container(cfg)),
        "group": cfg.wandb.get("group") or None,
        "job_type": cfg.wandb.get("job_type") or str(cfg.method.name),
    }
    if not os.environ.get("WANDB_SWEEP_ID"):
        # Under `wandb agent` the agent chose the run id; otherwise one W&B run per run
        # directory, so that a resumed run continues its own W&B run.
        kwargs["id"] = _stable_id(rdir)
        kwargs["resume"] = "allow"
    return WandbLogger(**kwargs)


def finish_wandb(logger, record: dict | None, failed: bool) -> None:
    """Write the run's final metrics and costs into the W&B summary and finish its W&B run;
    ``failed=True`` finishes it with exit code 1 (W&B shows it as failed). Never raises:
    a logging problem must not turn a finished run into a failed one."""
    if logger is None:
        return
    try:
        run = logger.experiment
        if record:
            summary = {str(k): v for k, v in (record.get("metrics") or {}).items()}
            summary.update({k: record[k] for k in SUMMARY_COSTS if record.get(k) is not None})
            summary["status"] = record.get("status", "failed" if failed else "completed")
            run.summary.update(summary)
        elif failed:
            run.summary.update({"status": "failed"})
        run.finish(exit_code=1 if failed else 0)
    except Exception as err:  # noqa: BLE001
        log.warning("W&B: could not finish the run cleanly: %s: %s", type(err).__name__, err)


def _stable_id(rdir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues its W&B run."""
    f = rdir / ".wandb_id"
    if f.is_file():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    rdir.mkdir(parents=True, exist_ok=True)
    f.write_text(rid)
    return rid
