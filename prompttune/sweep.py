"""Sweeps: a grid (or a union of grids) over config keys x seeds, run by any number of workers.

A sweep file is an experiment file with a ``sweep:`` block (docs/DEVELOPING.md, docs/scaling.md).
Every point of the grid is composed and validated before the first run starts, so a typo
in the last point costs nothing. Each point gets its own run directory,
``<runs_dir>/<point name>``.

Runs are *claimed* through an OS file lock (``filelock``) on ``<run dir>/.claim.lock``
while they train, so any number of ``prompttune sweep`` processes -- the workers of ``--jobs N``
on one machine, the tasks of a SLURM array (``--launcher slurm``), several machines sharing the
runs directory, ``wandb agent`` processes -- divide the grid and train no run twice. The
OS drops the lock when its holder dies, so a dead holder's claim is simply taken over.
``--jobs`` and SLURM live in :mod:`prompttune.launchers`.

Inside a DDP job (torchrun, srun, Lightning's own launcher) only rank 0 orchestrates: it claims,
writes records, prints progress and the report; the other ranks train the same runs alongside it.

Rerunning a sweep skips completed runs, resumes interrupted ones from ``last.ckpt``, and
skips failed ones unless ``--retry-failed`` (a failed run whose config has since been fixed
is rerun without asking). A completed run made with a different config is an error up
front: it is never returned as this sweep's result.

``--wandb`` logs every run to W&B (group = sweep name + grid point without the seed) and
writes one W&B sweep config per sub-grid whose command is ``prompttune sweep SWEEP --point
key=value ...``: the same composition, run directory and claim as a local sweep.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

import yaml

from prompttune.config import ConfigError, compose, load_yaml, repo_root
from prompttune.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("prompttune")
SWEEP_KEYS = {"name", "runs_dir", "grid", "seeds", "report"}
REPORT_KEYS = {"metric", "goal", "x"}
GOALS = ("maximize", "minimize")
EXIT_BUSY = 75  # `sweep --point`: the run is claimed by another live process (EX_TEMPFAIL)
CLAIM_FILE = ".claim.lock"
HOLDER_FILE = ".claim.holder"


class SweepInterrupted(Exception):
    """SIGTERM/SIGINT reached a sweep: it stopped, leaving every run resumable."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# --------------------------------------------------------------------------- the sweep file
def sweep_path(path: str | Path) -> Path:
    """The sweep file as given, or else relative to the repository (so an agent command
    naming ``experiments/x.yaml`` works from any directory)."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p.resolve() if p.exists() else p
    in_repo = repo_root() / p
    return in_repo if in_repo.is_file() else p


def load_sweep(path: str | Path) -> tuple[dict, dict]:
    path = sweep_path(path)
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
    block["report"] = dict(block.get("report") or {})
    bad = set(block["report"]) - REPORT_KEYS
    if bad:
        raise ConfigError(f"unknown key(s) {sorted(bad)} in {path}'s sweep.report; valid: {sorted(REPORT_KEYS)}")
    goal = block["report"].setdefault("goal", "maximize")
    if goal not in GOALS:
        raise ConfigError(f"sweep.report.goal in {path} is {goal!r}; expected one of {', '.join(GOALS)}")
    grids = block.get("grid") or {}
    grids = grids if isinstance(grids, list) else [grids]
    for g in grids:
        if not isinstance(g, dict) or not all(isinstance(v, list) and v for v in g.values()):
            raise ConfigError(f"{path}: each grid must map keys to non-empty lists of values, got {g!r}")
        if "seed" in g:
            raise ConfigError(f"{path}: put seeds in sweep.seeds, not in a grid (grid key 'seed')")
    block["grid"] = grids
    seeds = block["seeds"]
    if isinstance(seeds, int):
        block["seeds"] = list(range(seeds))
    seeds = block["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"sweep.seeds in {path} is {seeds!r}; expected a non-empty list of whole numbers >= 0 "
                          "(or a count, e.g. 3 for [0, 1, 2])")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep.seeds in {path} repeats a seed: {seeds!r}")
    data["_name"] = Path(path).stem
    block["_path"] = str(path)
    return block, data


def _grid_points(grid: dict, seeds: Iterable[int]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [{**dict(zip(keys, values)), "seed": int(seed)}
            for values in itertools.product(*(grid[k] for k in keys)) for seed in seeds]


def expand(block: dict) -> list[dict[str, Any]]:
    """Grid points (a union over the list of grids, duplicates dropped), each with its seed."""
    points, seen = [], set()
    for grid in block["grid"] or [{}]:
        for p in _grid_points(grid, block["seeds"]):
            ident = _ident(p)
            if ident not in seen:
                seen.add(ident)
                points.append(p)
    return points


def _ident(point: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in point.items()))


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


def group_name(sweep_name: str, point: dict[str, Any]) -> str:
    """W&B group: the sweep's name + the grid point without the seed (W&B averages a group's seeds)."""
    rest = {k: v for k, v in point.items() if k != "seed"}
    return f"{sweep_name}/{point_name(rest)}" if rest else str(sweep_name)


def plan(path: str | Path, extra: list[str] | tuple = (), runs_dir: str | Path | None = None,
         seeds: int | None = None, wandb: bool = False) -> tuple[dict, list[dict]]:
    """Compose and validate every run of the sweep; nothing runs, nothing is written."""
    block, exp = load_sweep(path)
    if runs_dir is not None:
        block["runs_dir"] = str(runs_dir)
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ConfigError(f"--seeds must be a whole number >= 1 (seeds 0..N-1), got {seeds!r}")
        block["seeds"] = list(range(seeds))
        block["_seeds_arg"] = seeds  # W&B agents' commands pass it on (their --point must accept those seeds)
    runs_dir = Path(block["runs_dir"])
    runs = []
    for point in expand(block):
        name = point_name(point)
        grid_point = {k: v for k, v in point.items() if k != "seed"}
        e = dict(exp)
        e["tags"] = {**(exp.get("tags") or {}), **grid_point}
        wb = dict(exp.get("wandb") or {})
        wb["group"] = group_name(block["name"], point)
        wb["tags"] = [*(wb.get("tags") or []), f"sweep={block['name']}",
                      *(f"{k}={v}" for k, v in grid_point.items())]
        if wandb:
            wb["enabled"] = True
        e["wandb"] = wb
        overrides = [*extra, *point_overrides(point), f"run_dir={runs_dir / name}", f"run_name={name}"]
        try:
            cfg = compose(e, overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep {path}, run {name}: {err}") from None
        runs.append({"name": name, "point": point, "cfg": cfg, "dir": runs_dir / name})
    return block, runs


# --------------------------------------------------------------------------- run state
def _same_config(rdir: Path, cfg) -> tuple[bool, str]:
    """Whether ``rdir/config.yaml`` was made by the same config as ``cfg`` (identity keys only)."""
    from omegaconf import OmegaConf

    from prompttune.runs import identity, identity_diff

    f = rdir / "config.yaml"
    try:
        old = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
    except Exception as err:  # noqa: BLE001 -- an unreadable config is simply "different"
        return False, f"unreadable config.yaml ({type(err).__name__})"
    a, b = identity(old), identity(cfg)
    return a == b, ("" if a == b else identity_diff(a, b))


def run_state(rdir: Path, cfg=None) -> str:
    """completed | failed | interrupted | pending, or -- when ``cfg`` is given and the run
    directory holds a run of another config -- stale (completed) or reset (failed/unfinished)."""
    from prompttune.runs import read_result

    rdir = Path(rdir)
    res = read_result(rdir)
    status = (res or {}).get("status")
    has_cfg = (rdir / "config.yaml").is_file()
    if status == "completed":
        state = "completed"
    elif status == "failed":
        state = "failed"
    elif has_cfg:
        state = "interrupted"
    else:
        return "pending"
    if cfg is not None and has_cfg and not _same_config(rdir, cfg)[0]:
        return "stale" if state == "completed" else "reset"
    return state


def check_not_stale(runs: list[dict], states: dict[str, str]) -> None:
    stale = [r for r in runs if states[r["name"]] == "stale"]
    if stale:
        diff = _same_config(stale[0]["dir"], stale[0]["cfg"])[1]
        raise ConfigError(
            f"{len(stale)} completed run(s) under {stale[0]['dir'].parent} were made with a different config "
            f"(e.g. {stale[0]['name']}: {diff}); a completed run is only reused for the same config. "
            "Choose another runs_dir (--runs-dir DIR) or delete those runs")


# --------------------------------------------------------------------------- claims
class Claim:
    """An exclusive, non-blocking claim on a run directory: an OS lock (flock) on
    ``<run dir>/.claim.lock``, released on exit *or death* of its holder. ``.claim.holder``
    names the holder (host, pid) for humans; the lock, not that file, is what counts."""

    def __init__(self, rdir: Path):
        from filelock import FileLock

        self.rdir = Path(rdir)
        self.rdir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.rdir / CLAIM_FILE), timeout=0, thread_local=False)

    def acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        atomic_write_text(self.rdir / HOLDER_FILE, f"{_host()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            (self.rdir / HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release(force=True)


def is_claimed(rdir: Path) -> bool:
    """Whether a live process holds the run's claim (probe: try to take it, give it back)."""
    if not (Path(rdir) / CLAIM_FILE).exists():
        return False
    c = Claim(rdir)
    if c.acquire():
        c._lock.release(force=True)  # keep the holder file of nobody: it is stale anyway
        return False
    return True


def _host() -> str:
    import platform

    return platform.node()


# --------------------------------------------------------------------------- signals
class _SignalGuard:
    """SIGTERM and SIGINT while a sweep runs: remember the signal and stop. Outside a fit the
    handler raises at once; inside one, Lightning's own SIGTERM handler (which chains to this
    one) stops the fit at the next step, and the sweep then reports the interrupt."""

    def __init__(self, raise_now: bool = True):
        self.received: int | None = None
        self.raise_now = raise_now
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.received = signum
        if not self.raise_now:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signal.getsignal(signum) == self._handle:  # nobody else (Lightning) is handling it: stop now
            raise SweepInterrupted(signum)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    def restore_sigint(self) -> None:
        """Lightning ignores SIGINT after a Ctrl-C; take it back for the rest of the sweep."""
        if self._old:
            signal.signal(signal.SIGINT, self._handle)


def _as_interrupt(err: BaseException, guard: _SignalGuard) -> SweepInterrupted | None:
    """The interrupt that ``err`` (raised by a fit) stands for, or None for an ordinary error.
    runs.fit raises ``RunInterrupted`` (a KeyboardInterrupt with the ``signum``)."""
    if isinstance(err, SweepInterrupted):
        return err
    if getattr(err, "signum", None) is not None and isinstance(err, (KeyboardInterrupt, SystemExit)):
        return SweepInterrupted(int(err.signum))
    if guard.received:
        return SweepInterrupted(guard.received)
    if isinstance(err, KeyboardInterrupt):
        return SweepInterrupted(signal.SIGINT)
    if "SIGTERM" in type(err).__name__:  # Lightning's SIGTERMException
        return SweepInterrupted(signal.SIGTERM)
    return None


# --------------------------------------------------------------------------- running one run
def is_follower() -> bool:
    """A non-zero rank of a DDP job (torchrun, Lightning's launcher, multi-task srun): it trains
    alongside rank 0 but orchestrates nothing (no claims, records, reports or progress lines)."""
    env = os.environ
    ranks = [env.get("RANK"), env.get("LOCAL_RANK"), env.get("NODE_RANK"), env.get("GROUP_RANK")]
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        ranks.append(env.get("SLURM_PROCID"))
    return any(r not in (None, "", "0") for r in ranks)


def _rank() -> str:
    env = os.environ
    ranks = [env.get(k) for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK")]
    return next((r for r in ranks if r not in (None, "", "0")), "0")


def _record_failure(run: dict, err: BaseException) -> None:
    from prompttune.runs import read_result

    if (read_result(run["dir"]) or {}).get("status") == "failed":
        return  # fit wrote its own record
    atomic_write_json(run["dir"] / "result.json", {
        "status": "failed", "run_name": run["name"], "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exception(type(err), err, err.__traceback__, limit=20),
        "tags": {k: v for k, v in run["point"].items() if k != "seed"}, "seed": run["point"]["seed"],
        "host": _host(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run_one(run: dict, guard: _SignalGuard, retry_failed: bool = False) -> tuple[str, str]:
    """Claim and train one run in this process. Returns (status, detail): status is one of
    completed | skipped | failed | busy. Interrupts propagate as :class:`SweepInterrupted`."""
    from prompttune.runs import fit

    if is_follower():  # DDP: rank 0 holds the claim and writes the record; this rank only trains
        if run_state(run["dir"]) != "completed":
            log.info("%s: rank %s trains it alongside rank 0", run["name"], _rank())
            fit(run["cfg"])
        return "completed", "(rank follower)"
    claim = Claim(run["dir"])
    if not claim.acquire():
        return "busy", "claimed by another process"
    try:
        state = run_state(run["dir"], run["cfg"])  # again: another process may have finished it
        if state == "completed":
            return "skipped", "completed"
        if state == "stale":
            return "failed", "completed with a different config (left untouched)"
        if state == "failed" and not retry_failed:
            return "skipped", "failed before (--retry-failed reruns it)"
        try:
            res = fit(run["cfg"], force=state in ("failed", "reset"))
        except BaseException as err:  # noqa: BLE001
            interrupt = _as_interrupt(err, guard)
            if interrupt is not None:
                raise interrupt from None
            if not isinstance(err, Exception):
                raise
            _record_failure(run, err)
            return "failed", f"{type(err).__name__}: {err}"
        if guard.received:  # a signal that arrived after the last step: the run finished, the sweep stops
            raise SweepInterrupted(guard.received)
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in (res or {}).get("metrics", {}).items())
        return "completed", metrics
    finally:
        claim.release()


# --------------------------------------------------------------------------- progress
class Progress:
    """One line per run: ``[k/N] point  status (time)  detail  elapsed  ETA``. The ETA is the mean
    time of the runs trained so far x the runs still to train / the number of jobs."""

    def __init__(self, total: int, to_train: int, jobs: int = 1):
        self.total, self.to_train, self.jobs, self.k = total, to_train, max(1, jobs), 0
        self.t0 = time.perf_counter()
        self.trained: list[float] = []

    def line(self, name: str, status: str, detail: str = "", secs: float | None = None) -> None:
        self.k += 1
        if secs is not None:
            self.trained.append(secs)
        elif status == "busy":
            self.to_train -= 1
        eta = "?"
        if self.trained:
            left = max(self.to_train - len(self.trained), 0)
            eta = _fmt_secs(sum(self.trained) / len(self.trained) * left / self.jobs)
        took = f" ({secs:.1f} s)" if secs is not None else ""
        print(f"[{self.k}/{self.total}] {name}  {status}{took}{'  ' + detail if detail else ''}  "
              f"elapsed {_fmt_secs(time.perf_counter() - self.t0)}  ETA {eta}", flush=True)


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


# --------------------------------------------------------------------------- W&B agents
def agent_sweep_ref(path: Path) -> str:
    """How an agent command names the sweep file: relative to the repository when it lies inside
    it (the same checkout path is not needed on other machines), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(repo_root()))
    except ValueError:
        return str(path)


def wandb_sweep_specs(block: dict, runs_dir: Path, extra: Iterable[str] = ()) -> list[dict]:
    """One W&B sweep config per sub-grid of the union: a grid over the sub-grid's keys and the seeds,
    whose command runs that point exactly as a local sweep would (run dir, claim, group, logging)."""
    metric = block["report"].get("metric") or "test/acc"
    specs = []
    grids = block["grid"] or [{}]
    for i, grid in enumerate(grids):
        params = {k: {"values": list(v)} for k, v in grid.items()}
        params["seed"] = {"values": [int(s) for s in block["seeds"]]}
        name = block["name"] if len(grids) == 1 else f"{block['name']}-{i + 1}"
        specs.append({
            "name": name,
            "method": "grid",
            "metric": {"name": metric, "goal": block["report"].get("goal", "maximize")},
            "parameters": params,
            # options before the positionals: argparse takes no option after the key=value list
            "command": ["${env}", "${interpreter}", "-m", "prompttune", "sweep", "--point", "--wandb", "--runs-dir",
                        str(Path(runs_dir).resolve()),
                        *(["--seeds", str(block["_seeds_arg"])] if block.get("_seeds_arg") else []),
                        agent_sweep_ref(Path(block["_path"])), *extra, "${args_no_hyphens}"],
        })
    return specs


def write_wandb_sweeps(block: dict, runs_dir: Path, extra: Iterable[str] = ()) -> list[Path]:
    specs = wandb_sweep_specs(block, runs_dir, extra)
    out = []
    for i, spec in enumerate(specs):
        f = runs_dir / ("wandb_sweep.yaml" if len(specs) == 1 else f"wandb_sweep_{i + 1}.yaml")
        atomic_write_text(f, yaml.safe_dump(spec, sort_keys=False))
        out.append(f)
    return out


def _matches(given: str, value: Any) -> bool:
    """Whether an override's text (as W&B writes it: ``str(value)``, or as YAML) means ``value``."""
    if given == str(value) or given == _yaml_value(value):
        return True
    try:
        return yaml.safe_load(given) == value
    except yaml.YAMLError:
        return False


def find_point(block: dict, runs: list[dict], overrides: list[str]) -> tuple[dict, list[str]]:
    """The planned run whose grid point the ``key=value`` overrides name (``--point``), and the
    other overrides (applied to the run as extras)."""
    grid_keys = {k for g in block["grid"] for k in g} | {"seed"}
    coords, rest = {}, []
    for o in overrides:
        key, _, value = o.partition("=")
        (coords.__setitem__(key, value) if key in grid_keys else rest.append(o))
    for r in runs:
        p = r["point"]
        if set(p) == set(coords) and all(_matches(coords[k], p[k]) for k in p):
            return r, rest
    keys = sorted({tuple(r["point"]) for r in runs}, key=len)
    raise ConfigError(f"--point {' '.join(f'{k}={v}' for k, v in coords.items()) or '(none)'} is not a point of "
                      f"sweep {block['name']!r}; a point sets exactly the keys of one sub-grid and the seed: "
                      + " | ".join(", ".join(k) for k in keys))


# --------------------------------------------------------------------------- entry points
def run_point(path: str | Path, overrides: list[str], runs_dir: str | Path | None = None, retry_failed: bool = False,
              wandb: bool = False, seeds: int | None = None) -> int:
    """``prompttune sweep SWEEP --point key=value ...``: run one grid point exactly as the sweep
    would (its run dir, claim, W&B group and tags). What W&B agents run.
    Exit code: 0 done (or completed before), 1 failed, ``EXIT_BUSY`` claimed elsewhere."""
    block, runs = plan(path, [], runs_dir=runs_dir, seeds=seeds, wandb=wandb)
    run, rest = find_point(block, runs, overrides)
    if rest:  # overrides for every run: compose this point again with them
        _, runs = plan(path, rest, runs_dir=runs_dir, seeds=seeds, wandb=wandb)
        run = next(r for r in runs if r["name"] == run["name"])
    if run_state(run["dir"], run["cfg"]) == "stale":
        check_not_stale([run], {run["name"]: "stale"})
    with _SignalGuard() as guard:
        t0 = time.perf_counter()
        status, detail = run_one(run, guard, retry_failed)
    if not is_follower():
        print(f"{run['name']}: {status} ({time.perf_counter() - t0:.1f} s)  {detail}", flush=True)
    return {"completed": 0, "skipped": 0, "busy": EXIT_BUSY}.get(status, 1)


def run_sweep(path: str | Path, dry_run: bool = False, wandb: bool = False, extra: list[str] | tuple = (),
              report: bool = True, runs_dir: str | Path | None = None, seeds: int | None = None, jobs: int = 1,
              retry_failed: bool = False) -> int:
    """Run (or list, ``dry_run``) every run of a sweep. 0 when no run failed, else 1; raises
    :class:`SweepInterrupted` on SIGTERM/SIGINT (every run stays resumable). ``jobs`` > 1: that many
    long-lived worker processes (:class:`prompttune.launchers.WorkerPool`) train the runs."""
    extra = list(extra)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and not dry_run and not is_follower():
        from prompttune.launchers import WorkerPool

        with WorkerPool(jobs, retry_failed) as pool:  # started first: their start-up overlaps composing the grid
            return _run_sweep(path, False, wandb, extra, report, runs_dir, seeds, jobs, retry_failed, pool)
    return _run_sweep(path, dry_run, wandb, extra, report, runs_dir, seeds, jobs, retry_failed, None)


def _run_sweep(path, dry_run, wandb, extra, report, runs_dir, seeds, jobs, retry_failed, pool) -> int:
    block, runs = plan(path, extra, runs_dir=runs_dir, seeds=seeds, wandb=wandb)
    runs_dir = Path(block["runs_dir"])
    follower = is_follower()
    if pool is not None:  # cores/N threads or GPUs/N devices per job, in each run's config (and so its config.yaml)
        from prompttune.launchers import apply_job_overrides

        gpus = apply_job_overrides(runs, jobs)
    states = {r["name"]: run_state(r["dir"], r["cfg"]) for r in runs}
    if dry_run:
        for r in runs:
            busy = "  (claimed: running now)" if is_claimed(r["dir"]) else ""
            print(f"{states[r['name']]:<12} {r['dir']}  {' '.join(point_overrides(r['point']))}{busy}")
        counts = {s: list(states.values()).count(s) for s in ("completed", "interrupted", "failed", "reset",
                                                              "stale", "pending")}
        print(f"{len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        if wandb:
            for f in write_wandb_sweeps(block, runs_dir, extra):
                print(f"W&B sweep config: {f}  (launch: wandb sweep {f}; then wandb agent ENTITY/PROJECT/ID)")
        return 0
    check_not_stale(runs, states)
    if not follower:
        runs_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(runs_dir / "sweep.json", {"name": block["name"], "source": str(block["_path"]),
                                                    "report": block["report"], "runs": [r["name"] for r in runs]})
        if wandb:
            for f in write_wandb_sweeps(block, runs_dir, extra):
                print(f"W&B sweep config: {f}  (launch: wandb sweep {f}; then wandb agent ENTITY/PROJECT/ID)")
    to_train = sum(s not in ("completed", "stale") and (retry_failed or s != "failed") for s in states.values())
    progress = Progress(len(runs), to_train, jobs)
    failed = 0
    with _SignalGuard(raise_now=(jobs == 1)) as guard:
        if pool is not None:
            failed = pool.run(runs, gpus, progress, guard)
        else:
            for r in runs:
                if follower and states[r["name"]] == "completed":
                    continue
                t0 = time.perf_counter()
                status, detail = run_one(r, guard, retry_failed)
                guard.restore_sigint()
                if not follower:
                    trained = status in ("completed", "failed")
                    progress.line(r["name"], status, detail, time.perf_counter() - t0 if trained else None)
                failed += status == "failed"
    if report and not follower:
        from prompttune.report import make_report

        out = make_report(runs_dir, allow_empty=True)  # the sweep's report settings come from sweep.json
        print(out["markdown"])
    return 1 if failed else 0
