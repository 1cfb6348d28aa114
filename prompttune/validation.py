"""Compose-time validation of values: enumerations and ranges, before any model or data is built.

:func:`prompttune.config.compose` checks the *shape* of a config (unknown keys, wrong
types); this module checks the *values* of the keys every run shares (optimiser, schedule,
batch sizes, shots, precision, model selection, seed) and then asks the chosen method's
:meth:`~prompttune.methods.base.Method.check_config` for its own keys. Each error names the
key, the value and what was expected, so the CLI can exit 2 before any compute and before
anything is written to the run directory.

The valid choices come from the code that consumes them (``module.OPTIMIZERS``,
``module.lr_lambda``, Lightning's precision table), so a new optimizer or schedule is valid
here the moment it exists there.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig

from prompttune.config import ConfigError

_MISSING = object()


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, (DictConfig, dict)) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: expected a number")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}={value!r}: expected a number, not NaN")
    return float(value)


def _integer(key: str, value: Any) -> int:
    v = _number(key, value)
    if not float(v).is_integer():
        raise ConfigError(f"{key}={value!r}: expected a whole number")
    return int(v)


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, integer: bool = False,
           allow_none: bool = False) -> Callable[[str, Any], None]:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    want = ("a whole number " if integer else "a number ") + " and ".join(parts) + (" (or null)" if allow_none else "")

    def check(key: str, value: Any) -> None:
        if value is None and allow_none:
            return
        v = _integer(key, value) if integer else _number(key, value)
        if math.isinf(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise ConfigError(f"{key}={value!r}: expected {want}")

    return check


def _one_of(choices_fn: Callable[[], tuple[str, ...]], allow_none: bool = False,
            case_insensitive: bool = False) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value is None and allow_none:
            return
        choices = choices_fn()
        if (str(value).lower() if case_insensitive else str(value)) not in choices:
            import difflib

            hint = difflib.get_close_matches(str(value), choices, n=1)
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))

    return check


def _optimizers() -> tuple[str, ...]:
    from prompttune.module import OPTIMIZERS

    return tuple(OPTIMIZERS)


def _scheduler(key: str, value: Any) -> None:
    from prompttune.module import lr_lambda

    try:
        lr_lambda(str(value), 10, 0)
    except ValueError as err:
        raise ConfigError(f"{key}={value!r}: {err}") from None


def _precisions() -> tuple[str, ...]:
    import typing

    from lightning.fabric import connector

    names: list[str] = ["auto"]
    for attr in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS", "_PRECISION_INPUT_INT"):
        names += [str(a) for a in typing.get_args(getattr(connector, attr, None)) if str(a) not in names]
    return tuple(names)


def _devices(key: str, value: Any) -> None:
    if value == "auto" or isinstance(value, (list, tuple)) or (isinstance(value, str) and value.replace(",", "").isdigit()):
        return
    if isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1):
        return
    raise ConfigError(f"{key}={value!r}: expected a device count >= 1, -1 (all), 'auto' or a list of device ids")


def _limit(key: str, value: Any) -> None:
    """Lightning's limit_*_batches: a fraction in [0, 1] or a whole number of batches >= 0."""
    if value is None:
        return
    v = _number(key, value)
    if v < 0 or (v > 1 and not v.is_integer()):
        raise ConfigError(f"{key}={value!r}: expected a fraction in [0, 1] or a whole number of batches >= 0")


# key -> check(key, value), raising ConfigError with the key, the value and what was expected
RULES: dict[str, Callable[[str, Any], None]] = {
    "seed": _range(0, integer=True),
    "method.optim.name": _one_of(_optimizers, case_insensitive=True),  # the module lower-cases it
    "method.optim.lr": _range(0, lo_open=True),
    "method.optim.epochs": _range(0, integer=True),  # >= 1 for a method that trains: check_values
    "method.optim.weight_decay": _range(0),
    "method.optim.momentum": _range(0, 1),
    "method.optim.warmup_epochs": _range(0),
    "method.optim.warmup_steps": _range(0, integer=True),
    "method.optim.min_lr": _range(0),
    "method.optim.scheduler": _scheduler,
    "data.batch_size": _range(1, integer=True),
    "data.eval_batch_size": _range(1, integer=True),
    "data.num_workers": _range(0, integer=True),
    "data.shots": _range(0, integer=True, allow_none=True),  # 0 / null: the whole training split
    "data.on_corrupt": _one_of(lambda: ("error", "skip")),
    "trainer.precision": _one_of(_precisions),
    "trainer.devices": _devices,
    "trainer.num_nodes": _range(1, integer=True),
    "trainer.cpu_threads": _range(1, integer=True, allow_none=True),
    "trainer.log_every_n_steps": _range(1, integer=True),
    "trainer.check_val_every_n_epoch": _range(1, integer=True, allow_none=True),
    "trainer.gradient_clip_val": _range(0, lo_open=True, allow_none=True),
    "trainer.limit_train_batches": _limit,
    "trainer.limit_val_batches": _limit,
    "trainer.limit_test_batches": _limit,
    "wandb.mode": _one_of(lambda: ("auto", "online", "offline", "disabled")),
}


def check_values(cfg: DictConfig) -> None:
    """Every shared key's value, then the chosen method's own checks."""
    for key, check in RULES.items():
        value = _get(cfg, key)
        if value is not _MISSING:
            check(key, value)
    from prompttune.registry import METHODS

    method_cls = METHODS.get(cfg.method.name)
    epochs = _get(cfg, "method.optim.epochs")
    if method_cls.trains and epochs == 0:
        raise ConfigError(f"method.optim.epochs=0: method {cfg.method.name!r} trains, so expected a whole number >= 1 "
                          "(0 is only for the training-free baselines)")
    method_cls.check_config(cfg)
    from prompttune.runs import selection

    select, _, _ = selection(cfg)  # select / select_mode / select_metric (its split), as the run reads them
    if select == "last" and cfg.get("select_metric") is not None:
        raise ConfigError(f"select_metric={cfg.select_metric!r} has no effect with select='last' (the last epoch is "
                          "reported); set select=val (honest) or select=test (the official protocols), or drop it")
