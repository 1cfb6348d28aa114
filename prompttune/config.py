"""Configs: defaults -> experiment file -> command-line ``key=value``, validated before compute.

Groups (``method``, ``backbone``, ``data``, ``task``, ``trainer``) are chosen by name from
``configs/<group>/<name>.yaml`` (layered over ``configs/<group>/_base.yaml``). A group is
chosen with a string (``method: coop`` in a file, ``method=coop`` on the command line, or
in an experiment's ``defaults:`` mapping) and tuned with a mapping or dotted keys
(``method: {n_ctx: 8}``, ``method.n_ctx=8``). Choosing a group again at a later layer
drops the tuning that earlier layers tied to *their* choice (keys of another method may not
exist in the new one); tuning in a layer that chose nothing (``experiments/smoke.yaml``'s
``method: {optim: {epochs: 1}}``) applies to whatever is chosen.
``backbone``, ``data`` and ``task`` default to what the method's ``uses:`` names.

Every key of every layer must already exist in what it overrides, with a compatible
type; otherwise :class:`ConfigError` names the key and the valid choices.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS = ("method", "backbone", "data", "task", "trainer")
# groups whose default choice comes from the method's `uses:` mapping
USES_GROUPS = ("backbone", "data", "task")


class ConfigError(ValueError):
    pass


_MISSING = object()


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    env = os.environ.get("PROMPTTUNE_CONFIGS")
    return Path(env) if env else repo_root() / "configs"


def cache_dir() -> Path:
    """User cache for zoo weights, generated data and feature caches."""
    env = os.environ.get("PROMPTTUNE_HOME")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prompttune"
    return base.expanduser()


_register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
for _name, _fn in (("cache", lambda sub="": str(cache_dir() / sub)), ("repo", lambda sub="": str(repo_root() / sub))):
    if not OmegaConf.has_resolver(_name):
        _register(_name, _fn)


# ---------------------------------------------------------------------------- loading
class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: Any, second: Any):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 and 1e38 as floats (YAML 1.1 wants a dot: 1.0e-3), and
    refuses a key given twice in one mapping (PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first is not None:
                raise _DuplicateKey(key, first, key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a syntax error names the file, line and column."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; name a YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at line {line}); "
                          "save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except _DuplicateKey as err:
        raise ConfigError(f"duplicate key {err.key!r} in {path}: first at line {err.first.line + 1}, again at "
                          f"line {err.second.line + 1}; keep one (YAML would silently drop the first)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def group_choices(group: str) -> list[str]:
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def load_group(group: str, name: str) -> dict:
    choices = group_choices(group)
    if name not in choices:
        hint = difflib.get_close_matches(str(name), choices, n=1)
        raise ConfigError(
            f"unknown {group} {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; valid choices: {', '.join(choices)}"
        )
    base_file = config_dir() / group / "_base.yaml"
    base = load_yaml(base_file) if base_file.exists() else {}
    own = load_yaml(config_dir() / group / f"{name}.yaml")
    return _merge_checked(base, own, f"{group}", allow_new=True)


def parse_dotlist(items: Iterable[str]) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"command-line override {item!r} has an empty key")
        try:
            parsed = yaml.load(value, Loader=_Loader) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if key in GROUPS:  # a group choice: may sit beside dotted tuning of the same group
            out.setdefault("defaults", {})[key] = parsed
            continue
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {item!r} conflicts with an earlier one")
        node[parts[-1]] = parsed
    return out


# ---------------------------------------------------------------------------- merging
# keys whose values are an int *or* a float in their own right (Lightning's limit_*_batches:
# a number of batches or a fraction), so an int default does not make a float a wrong type
_INT_OR_FLOAT_KEYS = {"limit_train_batches", "limit_val_batches", "limit_test_batches", "gradient_clip_val",
                      "warmup_epochs", "val_check_interval"}


# Lightning's `devices`: a count, "auto", "0,1" or a list of ids; its value is checked in validation.py
# MMICT data: `prompt` is one instruction or a list of templates, `ann_file` one file or a list to
# merge (MSR-VTT); the datamodules check their values (prompttune/data/coco_captions.py)
_ANY_TYPE_KEYS = {"devices", "prompt", "ann_file"}


def _type_ok(base: Any, new: Any, key: str = "") -> bool:
    if base is None or new is None or key in _ANY_TYPE_KEYS:
        return True
    if key in _INT_OR_FLOAT_KEYS and isinstance(base, (int, float)) and isinstance(new, (int, float)):
        return not isinstance(base, bool) and not isinstance(new, bool)
    if isinstance(base, bool) or isinstance(new, bool):
        return isinstance(base, bool) and isinstance(new, bool)
    if isinstance(base, (int, float)):
        if not isinstance(new, (int, float)):
            return False
        return not (isinstance(base, int) and isinstance(new, float) and not new.is_integer())
    if isinstance(base, str):
        return isinstance(new, (str, int, float))
    if isinstance(base, (list, tuple)):
        return isinstance(new, (list, tuple))
    if isinstance(base, dict):
        return isinstance(new, dict)
    return True


def _merge_checked(base: dict, new: dict, where: str, allow_new: bool = False) -> dict:
    out = dict(base)
    for key, value in new.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            if allow_new or _is_open(base):
                out[key] = value
                continue
            choices = sorted(k for k in base if not str(k).startswith("_"))
            hint = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1)
            raise ConfigError(
                f"unknown key {path!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; valid keys here: {', '.join(map(str, choices))}"
            )
        old = base[key]
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = _merge_checked(old, value, path, allow_new=allow_new or _is_open(old))
        elif not _type_ok(old, value, str(key)):
            raise ConfigError(
                f"wrong type for {path!r}: got {value!r} ({type(value).__name__}), "
                f"expected {type(old).__name__} like the default {old!r}"
            )
        else:
            if (isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float) and value.is_integer()
                    and str(key) not in _INT_OR_FLOAT_KEYS):
                value = int(value)
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            out[key] = value
    return out


def _is_open(node: Any) -> bool:
    """An empty mapping in a default (``tags: {}``) accepts any keys."""
    return isinstance(node, dict) and (len(node) == 0 or node.get("_open_", False))


# ---------------------------------------------------------------------------- compose
def compose(experiment: str | Path | dict | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Build the resolved, validated config of one run."""
    defaults = load_yaml(config_dir() / "defaults.yaml")
    if isinstance(experiment, (str, Path)):
        exp = load_yaml(experiment)
        exp_name = Path(experiment).stem
    else:
        exp = dict(experiment or {})
        exp_name = exp.pop("_name", None) if exp else None
    cli = parse_dotlist(overrides)
    layers = [("defaults", defaults), ("experiment", exp), ("command line", cli)]

    choices: dict[str, Any] = {}
    # per group: (layer label, tuning, whether that layer also chose the group)
    tuning: dict[str, list[tuple[str, dict, bool]]] = {g: [] for g in GROUPS}
    flat_layers = []
    for label, layer in layers:
        layer = dict(layer)
        picks = layer.pop("defaults", None) or {}
        if not isinstance(picks, dict):
            raise ConfigError(f"'defaults' in the {label} must map group names to choices, e.g. {{method: coop}}")
        chosen_here = set()
        for g, v in picks.items():
            if g not in GROUPS:
                raise ConfigError(f"unknown group {g!r} in the {label}'s defaults; valid groups: {', '.join(GROUPS)}")
            choices[g] = v
            chosen_here.add(g)
        for g in GROUPS:
            v = layer.pop(g, _MISSING)
            if v is _MISSING:
                continue
            if v is None or isinstance(v, str):
                choices[g] = v
                chosen_here.add(g)
            elif isinstance(v, dict):
                tuning[g].append((label, v, g in chosen_here))
            else:
                raise ConfigError(f"{g!r} in the {label} must be a name ({', '.join(group_choices(g))}) or a mapping")
        for g in chosen_here:  # a new choice drops earlier layers' choice-bound tuning
            tuning[g] = [t for t in tuning[g] if t[0] == label or not t[2]]
        flat_layers.append((label, layer))

    # plain keys
    cfg = {}
    for label, layer in flat_layers:
        cfg = _merge_checked(cfg, layer, "", allow_new=(label == "defaults"))

    # groups: the method first, since it names the others' defaults
    method_name = choices.get("method")
    if not method_name:
        raise ConfigError(f"no method chosen; valid choices: {', '.join(group_choices('method'))}")
    resolved_choices = {}
    for g in GROUPS:
        name = choices.get(g)
        if name is None and g in USES_GROUPS:
            name = cfg.get("method", {}).get("uses", {}).get(g)
            if name is None:
                raise ConfigError(f"method {method_name!r} names no default {g}; choose one with {g}=NAME")
        if name is None:
            raise ConfigError(f"no {g} chosen; valid choices: {', '.join(group_choices(g))}")
        node = load_group(g, str(name))
        for label, t, _ in tuning[g]:
            node = _merge_checked(node, t, g)
        cfg[g] = node
        resolved_choices[g] = str(name)
    cfg["choices"] = resolved_choices
    if exp_name and not cfg.get("experiment"):
        cfg["experiment"] = exp_name

    conf = OmegaConf.create(cfg)
    try:
        OmegaConf.resolve(conf)
    except Exception as err:  # interpolation errors name the key
        raise ConfigError(f"could not resolve config: {err}") from None
    validate(conf)
    return conf


def validate(cfg: DictConfig) -> None:
    """Checks that need the registries: every named component exists."""
    from prompttune import registry

    for group, reg in (("method", registry.METHODS), ("backbone", registry.BACKBONES),
                       ("data", registry.DATASETS), ("task", registry.TASKS)):
        name = cfg[group].get("name")
        if name not in reg:
            raise ConfigError(
                f"{group} config {cfg.choices[group]!r} names {group} {name!r}, which is not registered; "
                f"valid: {', '.join(reg.names())}"
            )
    from prompttune.validation import check_values

    check_values(cfg)


def to_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def save(cfg: DictConfig, path: str | Path) -> None:
    from prompttune.utils import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
