"""Weights & Biases through Lightning's WandbLogger, never hanging a run.

``wandb.mode: auto`` logs online when an API key is configured and the service answers
within a few seconds, and otherwise offline (into ``<run_dir>/wandb``, syncable later with
``wandb sync``), saying why. API keys are read from the environment or netrc by wandb
itself; they are never written into configs or logs.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from omegaconf import DictConfig

from prompttune.config import to_container

log = logging.getLogger("prompttune")
SECRET_KEYS = ("api_key", "key", "token", "password", "secret")


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
    if not has_api_key():
        if mode == "online":
            return "offline", "no W&B API key found; logging offline instead (sync later with `wandb sync`)"
        return "offline", "no W&B API key: logging offline (sync later with `wandb sync`)"
    if not _login_ok(timeout):
        return "offline", "W&B login failed (bad key or no network); logging offline instead"
    return "online", "online"


def scrub(obj):
    """Drop anything that looks like a secret from a config before it is logged."""
    if isinstance(obj, dict):
        return {k: ("***" if any(s in str(k).lower() for s in SECRET_KEYS) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def make_wandb_logger(cfg: DictConfig, rdir: Path, name: str):
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
    return WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, name=name, save_dir=str(rdir),
                       mode=mode, tags=list(cfg.wandb.tags), config=scrub(to_container(cfg)), id=_stable_id(rdir))


def _stable_id(rdir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues its W&B run."""
    f = rdir / ".wandb_id"
    if f.is_file():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid
