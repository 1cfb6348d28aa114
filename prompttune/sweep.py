"""Sweeps: a grid over config keys x seeds, run locally, resumable.

A sweep file is an experiment file with a ``sweep:`` block (see docs/DEVELOPING.md).
Every point of the grid is composed and validated before the first run starts, so a typo
in the last point costs nothing. Rerunning skips completed runs (``result.json`` with
status "completed") and resumes interrupted ones from their last checkpoint; a run that
fails is recorded (``result.json`` with status "failed" and the error) and the sweep
goes on. ``--wandb`` also writes a W&B sweep config whose command is ``prompttune fit``.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from prompttune.config import ConfigError, compose, load_yaml
from prompttune.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("prompttune")
SWEEP_KEYS = {"name", "runs_dir", "grid", "seeds", "report"}


def load_sweep(path: str | Path) -> tuple[dict, dict]:
    data = load_yaml(path)
    block = data.pop("sweep", None)
    if not isinstance(block, dict):
        raise ConfigError(f"{path} has no `sweep:` block (expected keys: {', '.join(sorted(SWEEP_KEYS))})")
    unknown = set(block) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {path}'s sweep block; valid: {sorted(SWEEP_KEYS)}")
    block.setdefault("name", Path(path).stem)
    block.setdefault("runs_dir", f"runs/{block['name']}")
    block.setdefault("seeds", [0])
    block.setdefault("report", {})
    grids = block.get("grid") or {}
    grids = grids if isinstance(grids, list) else [grids]
    for g in grids:
        if not isinstance(g, dict) or not all(isinstance(v, list) and v for v in g.values()):
            raise ConfigError(f"{path}: each grid must map keys to non-empty lists of values, got {g!r}")
    block["grid"] = grids
    seeds = block["seeds"]
    if isinstance(seeds, int):
        block["seeds"] = list(range(seeds))
    data["_name"] = Path(path).stem
    return block, data


def expand(block: dict) -> list[dict[str, Any]]:
    """Grid points (a union over the list of grids, duplicates dropped), each with its seed."""
    points, seen = [], set()
    for grid in block["grid"] or [{}]:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            for seed in block["seeds"]:
                p = dict(zip(keys, values))
                p["seed"] = int(seed)
                ident = tuple(sorted((k, repr(v)) for k, v in p.items()))
                if ident not in seen:
                    seen.add(ident)
                    points.append(p)
    return points


def point_name(point: dict[str, Any]) -> str:
    parts = []
    for k, v in point.items():
        short = "s" if k == "seed" else k.split(".")[-1]
        parts.append(f"{short}{v}" if k == "seed" else f"{short}={v}")
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={_yaml_value(v)}" for k, v in point.items()]


def _yaml_value(v: Any) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")


def plan(path: str | Path, extra: list[str] | tuple = (), runs_dir: str | Path | None = None,
         seeds: int | None = None) -> tuple[dict, list[dict]]:
    """Compose and validate every run of the sweep; nothing runs."""
    block, exp = load_sweep(path)
    if runs_dir is not None:
        block["runs_dir"] = str(runs_dir)
    if seeds is not None:
        block["seeds"] = list(range(seeds))
    runs_dir = Path(block["runs_dir"])
    runs = []
    for point in expand(block):
        name = point_name(point)
        tags = {k: v for k, v in point.items() if k != "seed"}
        e = dict(exp)
        e["tags"] = {**(exp.get("tags") or {}), **tags}
        overrides = [*extra, *point_overrides(point), f"run_dir={runs_dir / name}", f"run_name={name}"]
        try:
            cfg = compose(e, overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep {path}, run {name}: {err}") from None
        runs.append({"name": name, "point": point, "cfg": cfg, "dir": runs_dir / name})
    return block, runs


def run_state(rdir: Path) -> str:
    from prompttune.runs import read_result

    res = read_result(rdir)
    if res and res.get("status") == "completed":
        return "completed"
    if res and res.get("status") == "failed":
        return "failed"
    if (rdir / "config.yaml").exists():
        return "interrupted"
    return "pending"


def write_wandb_sweep(path: str | Path, block: dict, runs_dir: Path) -> Path:
    params: dict[str, Any] = {}
    for grid in block["grid"]:
        for k, vals in grid.items():
            params.setdefault(k, {"values": []})
            params[k]["values"] += [v for v in vals if v not in params[k]["values"]]
    params["seed"] = {"values": list(block["seeds"])}
    metric = block["report"].get("metric", "test/acc")
    spec = {
        "name": block["name"],
        "program": "prompttune",
        "method": "grid",
        "metric": {"name": metric, "goal": "maximize"},
        "parameters": params,
        "command": ["${env}", "prompttune", "fit", str(path), "wandb.enabled=true", "${args_no_hyphens}"],
    }
    out = runs_dir / "wandb_sweep.yaml"
    atomic_write_text(out, yaml.safe_dump(spec, sort_keys=False))
    return out


def run_sweep(path: str | Path, dry_run: bool = False, wandb: bool = False, extra: list[str] | tuple = (),
              report: bool = True, runs_dir: str | Path | None = None, seeds: int | None = None) -> int:
    from prompttune.runs import fit

    block, runs = plan(path, extra, runs_dir=runs_dir, seeds=seeds)
    runs_dir = Path(block["runs_dir"])
    states = {r["name"]: run_state(r["dir"]) for r in runs}
    if dry_run:
        for r in runs:
            print(f"{states[r['name']]:<12} {r['dir']}  {' '.join(point_overrides(r['point']))}")
        counts = {s: list(states.values()).count(s) for s in ("completed", "interrupted", "failed", "pending")}
        print(f"{len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        return 0
    runs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(runs_dir / "sweep.json", {"name": block["name"], "source": str(path),
                                                "report": block["report"], "runs": [r["name"] for r in runs]})
    if wandb:
        print(f"W&B sweep config: {write_wandb_sweep(path, block, runs_dir)} (launch: wandb sweep <file>)")
    failed = 0
    for i, r in enumerate(runs, 1):
        state = states[r["name"]]
        if state == "completed":
            log.info("[%d/%d] %s: completed, skipped", i, len(runs), r["name"])
            continue
        log.info("[%d/%d] %s%s", i, len(runs), r["name"], " (resuming)" if state == "interrupted" else "")
        t0 = time.perf_counter()
        try:
            res = fit(r["cfg"], force=(state == "failed"))
            m = ", ".join(f"{k}={v:.4f}" for k, v in (res or {}).get("metrics", {}).items())
            log.info("    %s  (%.1f s)", m, time.perf_counter() - t0)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # record and go on: one bad run must not sink the sweep
            failed += 1
            log.error("    failed: %s: %s", type(err).__name__, err)
            atomic_write_json(r["dir"] / "result.json", {
                "status": "failed", "run_name": r["name"], "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=20), "tags": {k: v for k, v in r["point"].items() if k != "seed"},
                "seed": r["point"]["seed"]})
    if report:
        from prompttune.report import make_report

        out = make_report(runs_dir, **{k: block["report"].get(k) for k in ("metric", "x")})
        print(out["markdown"])
    return 1 if failed else 0
