"""``prompttune demo``: the embedded default comparison, offline, with verdicts.

Each section is a sweep file ``experiments/demo_<section>.yaml`` run into
``<runs_dir>/<section>/`` (zoo backbones are built on first use, synthetic data is
generated on first use). After a section, each of its *claims* -- a paper's direction, "A
beats B on this metric" -- is checked against the runs: the paired difference A - B with a
95 % CI over seeds and test items (:mod:`prompttune.stats`, from each run's
``test_items.json``), and a verdict (holds / inconclusive / reversed). Every method's own
row shows its test-sampling interval. The section reports and verdicts are gathered into
``<runs_dir>/README.md`` and ``<runs_dir>/verdicts.json``. Rerunning skips what is done.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from prompttune import stats
from prompttune.compare import matches, paired, records, scale_of, scores_by_seed, select, setting_name
from prompttune.config import ConfigError, repo_root
from prompttune.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("prompttune")
ORDER = ("clip", "retrieval", "vpt", "icl", "mmict", "tvp")


@dataclass(frozen=True)
class Claim:
    """A paper's direction: runs tagged ``a`` beat (``direction`` "+") runs tagged ``b`` on ``metric``."""

    section: str
    paper: str
    a: dict[str, Any]
    b: dict[str, Any]
    metric: str
    direction: str = "+"
    note: str = ""
    tags: dict[str, Any] = field(default_factory=dict)  # shared by a and b (e.g. the shot count)

    @property
    def label(self) -> str:
        def name(t):
            return ",".join(f"{v}" if k == "method" else f"{k.split('.')[-1]}={v}" for k, v in t.items())

        return f"{name(self.a)} {'>' if self.direction == '+' else '<'} {name(self.b)}"


CLAIMS: tuple[Claim, ...] = (
    Claim("clip", "CoOp (Zhou et al., IJCV 2022)", {"method": "coop"}, {"method": "zero_shot"}, "test/acc",
          tags={"data.shots": 16}),
    Claim("retrieval", "DCAR (arXiv 2508.04028)", {"method": "dual_prompt"}, {"method": "coop_retrieval"},
          "test/rsum"),
    Claim("retrieval", "DCAR (arXiv 2508.04028), CoOp row", {"method": "coop_retrieval"},
          {"method": "zero_shot_retrieval"}, "test/rsum"),
    Claim("vpt", "SPT (Wang et al., ICML 2024)", {"method": "spt_deep"}, {"method": "vpt_deep"}, "test/acc",
          note="the zoo MAE-ViT's features are near an untrained ViT's (probe 0.141), so no start has class "
               "information to give; on a competent ViT SPT trails VPT (experiments/ablation_spt_clip.yaml, "
               "docs/visual_prompt_tuning.md)"),
    Claim("icl", "E-InMeMo (J. Imaging 2025)", {"method": "e_inmemo"}, {"method": "inmemo"}, "test/miou",
          note="the paper's margin is +0.64; at 2-3 seeds the seed decides the sign, over forty seeds it is -0.03 "
               "[-0.71, +0.63] (`prompttune sweep experiments/demo_icl.yaml --seeds 40`, docs/visual_icl.md)"),
    Claim("icl", "InMeMo (WACV 2024)", {"method": "inmemo"}, {"method": "no_prompt"}, "test/miou"),
    Claim("mmict", "MMICT (arXiv 2312.06363)", {"method": "mhub"}, {"method": "vanilla_ict"}, "test/cider"),
    Claim("mmict", "MMICT (arXiv 2312.06363)", {"method": "mhub"}, {"method": "ft_qformer"}, "test/cider"),
    Claim("tvp", "TVP (Zhang et al., CVPR 2024), transfer", {"method": "tvp"}, {"method": "vp"}, "test/transfer_acc",
          note="prompt trained on clip-tiny (TSE on clip-tiny-s2), scored unchanged on clip-tiny-p8; at the official "
               "weights FCA and TSE carry < 1 % of the step (`python -m prompttune.transfer probe`); with them made to "
               "act, TVP does not reduce the negative transfer the world has (experiments/ablation_tvp.yaml, docs/tvp.md)"),
    Claim("tvp", "TVP (Zhang et al., CVPR 2024), source", {"method": "tvp"}, {"method": "vp"}, "test/acc",
          note="on the source model itself"),
)

def sections() -> dict[str, Path]:
    found = {p.stem.removeprefix("demo_"): p for p in sorted((repo_root() / "experiments").glob("demo_*.yaml"))}
    return dict(sorted(found.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


# ------------------------------------------------------------------ verdicts
def check_claim(claim: Claim, section_dir: Path) -> dict[str, Any]:
    """A claim against a section's runs: A and B must each name one setting
    (:func:`prompttune.compare.select`), paired by seed and test item (:func:`prompttune.compare.paired`)."""
    row: dict[str, Any] = {"section": claim.section, "paper": claim.paper, "claim": claim.label,
                           "metric": claim.metric, "direction": claim.direction, "note": claim.note}
    recs = records(section_dir)
    sel_a = [r for r in recs if matches(r, {**claim.tags, **claim.a})]
    sel_b = [r for r in recs if matches(r, {**claim.tags, **claim.b})]
    if not sel_a or not sel_b:
        return {**row, "verdict": "not run", "why": f"runs found: A {len(sel_a)}, B {len(sel_b)}"}
    try:
        sel_a, sel_b = select(sel_a, {**claim.tags, **claim.a}, "A"), select(sel_b, {**claim.tags, **claim.b}, "B")
        return {**row, **paired(sel_a, sel_b, claim.metric, claim.direction)}
    except (ConfigError, ValueError, KeyError) as err:
        return {**row, "verdict": "not measurable", "why": str(err)}


def method_rows(section_dir: Path, metric: str) -> list[dict[str, Any]]:
    """Each grid point's mean with its 95 % interval over seeds and test items."""
    groups: dict[str, list[dict]] = {}
    for r in records(section_dir):
        groups.setdefault(setting_name(r), []).append(r)
    rows = []
    for key, recs in sorted(groups.items()):
        try:
            by_seed = scores_by_seed(recs)
            m = stats.mean_ci(stats.aligned_scores(list(by_seed.values()), metric))
        except (ValueError, KeyError) as err:
            rows.append({"setting": key, "why": str(err)})
            continue
        rows.append({"setting": key, **m})
    return rows


def verdict_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| paper | claim | metric | A − B, 95 % CI (seeds × items) | items only | seeds only | seeds, items | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "diff" not in r:
            lines.append(f"| {r['paper']} | {r['claim']} | {r['metric']} | — | — | — | — | {r['verdict']}: {r['why']} |")
            continue
        s = r["scale"]
        lines.append(f"| {r['paper']} | {r['claim']} | {r['metric']} | {r['diff'] * s:+.2f} {stats.fmt_ci(r['ci'], s)} "
                     f"| {stats.fmt_ci(r['ci_items'], s)} | {stats.fmt_ci(r['ci_seeds'], s)} "
                     f"| {r['n_seeds']}, {r['n_items']} | **{r['verdict']}** |")
    notes = [f"- {r['claim']}: {r['note']}" for r in results if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def rows_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    s = scale_of(metric)
    lines = [f"| setting | {metric} | 95 % CI (seeds × test items) | seeds | items |", "|---|---|---|---|---|"]
    for r in rows:
        if "mean" not in r:
            lines.append(f"| {r['setting']} | — | {r['why']} | | |")
        else:
            lines.append(f"| {r['setting']} | {r['mean'] * s:.2f} | [{r['ci'][0] * s:.2f}, {r['ci'][1] * s:.2f}] "
                         f"| {r['n_seeds']} | {r['n_items']} |")
    return "\n".join(lines) + "\n"


def section_verdicts(section: str, section_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    claims = [c for c in CLAIMS if c.section == section]
    results = [check_claim(c, section_dir) for c in claims]
    metrics = list(dict.fromkeys(c.metric for c in claims))
    parts = []
    for m in metrics:
        parts.append(rows_markdown(method_rows(section_dir, m), m))
    if results:
        parts.append(verdict_markdown(results))
    return "\n".join(parts), results


# ------------------------------------------------------------------ running: zoo builds and sections in parallel
# Rough single-thread costs on a quiet 2-core machine (seconds), used only to start the longest
# tasks first; unknown tasks count as 60 s.
COST_HINT = {"zoo:clip-tiny": 250, "zoo:blip2-tiny": 170, "zoo:mae-vqgan-tiny": 174, "zoo:vit-mae-tiny": 74,
             "zoo:clip-tiny-s2": 51, "zoo:clip-tiny-p8": 65, "zoo:clip-tiny-s1": 51,
             "clip": 85, "icl": 71, "vpt": 68, "tvp": 58, "retrieval": 105, "mmict": 100}
_PROGRESS = ("[", "zoo:", "warning", "error", "Traceback", "prompttune")


def zoo_needs(runs: list[dict[str, Any]]) -> list[str]:
    """The zoo entries the runs of a sweep load pretrained: every ``zoo_entry`` in their resolved
    configs, and every value naming a zoo entry or a backbone config that has one (e.g. TVP's
    ``tse_backbone``). Entries only loaded with ``weights: random`` are not needed."""
    from prompttune import zoo
    from prompttune.config import load_yaml, to_container

    known = set(zoo.names())
    found: list[str] = []

    def backbone_entry(name: str) -> str | None:
        path = repo_root() / "configs" / "backbone" / f"{name}.yaml"
        if not path.is_file():
            return None
        try:
            return (load_yaml(path) or {}).get("zoo_entry")
        except (ConfigError, OSError):  # not ours to report here: the sweep's own check does
            return None

    def walk(obj: Any, random_weights: bool = False) -> None:
        if isinstance(obj, dict):
            rnd = str(obj.get("weights", "")) == "random"
            for k, v in obj.items():
                if k == "zoo_entry" and isinstance(v, str) and not rnd:
                    found.append(v)
                elif k != "uses":  # a method's default groups, overridden where the run sets them
                    walk(v, rnd)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, random_weights)
        elif isinstance(obj, str) and not random_weights:
            if obj in known:
                found.append(obj)
            elif obj.startswith("zoo_") and (e := backbone_entry(obj)):
                found.append(e)

    for r in runs:
        walk(to_container(r["cfg"]))
    return [n for n in dict.fromkeys(found) if n in known]


@dataclass
class _Task:
    key: str                    # "zoo:<entry>" or the section name
    cmd: list[str]
    log: Path
    needs: tuple[str, ...] = ()
    fn: Any = None              # the same work as ``cmd``, as a call returning an exit code (run in a fork)
    proc: Any = None
    t0: float = 0.0
    seconds: float = 0.0
    rc: int | None = None
    pos: int = 0                # how far its log has been echoed


class _Forked:
    """A forked child, with the part of Popen's interface the scheduler uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        import os

        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N, as Popen
        return self.returncode

    def send_signal(self, signum: int) -> None:
        import os

        if self.poll() is None:
            os.kill(self.pid, signum)


def _fork_child(fn, log: Path, env: dict[str, str]) -> _Forked:
    """Run ``fn()`` in a forked child whose stdout and stderr go to ``log``; its return value (or
    SystemExit code) is the child's exit code. The child inherits the parent's imported modules:
    a fresh interpreter spends ~7 s of CPU importing torch, Lightning, open_clip and transformers,
    ~90 s over the demo's dozen children on 2 cores."""
    import os
    import signal
    import sys
    import traceback

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    rc = 1
    try:  # the child: never returns into the parent's code
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        # fresh line-buffered streams on the log (sys.stdout may be a wrapper that is not fd 1)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        os.environ.update(env)
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        out = fn()
        rc = out if isinstance(out, int) else 0
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except KeyboardInterrupt:
        rc = 130
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def can_fork() -> bool:
    """Forked children on Linux; elsewhere (macOS's frameworks are not fork-safe) fresh interpreters."""
    import os
    import sys

    return sys.platform.startswith("linux") and hasattr(os, "fork")


class _Scheduler:
    """Runs tasks as child processes, at most ``jobs`` at once, one intra-op thread each, a task
    starting once every task it needs has succeeded (longest first, by :data:`COST_HINT`). A task
    with a ``fn`` runs it in a forked child where :func:`can_fork`, else its ``cmd`` in a fresh
    interpreter. Each child's output goes to its log; progress lines are echoed prefixed with the
    task. SIGTERM and SIGINT are passed on to the children (which stop after their current batch
    and keep their checkpoints) and the demo exits with 143 / 130."""

    def __init__(self, tasks: list[_Task], jobs: int):
        self.tasks, self.jobs = tasks, max(1, jobs)
        self.stop_signal: int | None = None

    def _env(self) -> dict[str, str]:
        import os

        env = dict(os.environ)
        # one thread per child: 2 children on 2 cores, and numbers that do not depend on the core count
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_MININTERVAL="30")
        return env

    def _echo(self, t: _Task) -> None:
        try:
            with open(t.log, "rb") as fh:
                fh.seek(t.pos)
                data = fh.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1
        t.pos += cut
        for line in data[:cut].decode("utf-8", "replace").replace("\r", "\n").splitlines():
            line = line.strip()
            if line.startswith(_PROGRESS) or "%|" in line:  # run lines, zoo messages, a bar every 30 s
                print(f"  [{t.key}] {line[:200]}", flush=True)

    def run(self) -> int:
        import signal
        import subprocess

        def on_signal(signum, frame):
            self.stop_signal = signum
            for t in self.tasks:
                if t.proc is not None and t.rc is None:
                    t.proc.send_signal(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            pending, running = list(self.tasks), []
            pending.sort(key=lambda t: (not t.key.startswith("zoo:"), -COST_HINT.get(t.key, 60)))
            done: dict[str, int] = {}
            while pending or running:
                for t in list(running):
                    self._echo(t)
                    if t.proc.poll() is not None:
                        t.rc, t.seconds = t.proc.returncode, time.perf_counter() - t.t0
                        self._echo(t)
                        running.remove(t)
                        done[t.key] = t.rc
                        state = "done" if t.rc == 0 else f"FAILED (exit code {t.rc}; log: {t.log})"
                        print(f"== {t.key}: {state} in {t.seconds:.0f} s", flush=True)
                if self.stop_signal is not None:
                    if not running:
                        return 128 + self.stop_signal
                    time.sleep(0.2)
                    continue
                for t in list(pending):
                    if len(running) >= self.jobs:
                        break
                    failed = [n for n in t.needs if done.get(n) not in (None, 0)]
                    if failed:  # what it needs could not be built: report it and go on with the rest
                        pending.remove(t)
                        t.rc, done[t.key] = 1, 1
                        print(f"== {t.key}: not run, it needs {', '.join(failed)}", flush=True)
                        continue
                    if any(n not in done for n in t.needs):
                        continue
                    pending.remove(t)
                    t.log.parent.mkdir(parents=True, exist_ok=True)
                    t.pos = t.log.stat().st_size if t.log.exists() else 0  # a rerun appends to its log
                    t.t0 = time.perf_counter()
                    if t.fn is not None and can_fork():
                        t.proc = _fork_child(t.fn, t.log, self._env())  # the child opens the log itself
                    else:
                        with open(t.log, "ab") as fh:
                            t.proc = subprocess.Popen(t.cmd, stdout=fh, stderr=subprocess.STDOUT, env=self._env(),
                                                      stdin=subprocess.DEVNULL)
                    running.append(t)
                    print(f"== {t.key}: started (log: {t.log})", flush=True)
                time.sleep(0.5)
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def exit_status(tasks: list[_Task]) -> int:
    """The demo's exit code: 0 when every child succeeded, else the largest child's code, a child
    killed by a signal counting as 128 + the signal (as a shell reports it)."""
    codes = [t.rc if t.rc >= 0 else 128 - t.rc for t in tasks if t.rc]
    return max(codes, default=0)


def _preimport() -> None:
    """The heavy libraries the sections and zoo builds use that planning did not import."""
    import importlib

    for name in ("open_clip", "timm", "transformers.models.blip_2.modeling_blip_2",
                 "transformers.models.opt.modeling_opt", "lightning.pytorch"):
        try:
            importlib.import_module(name)
        except Exception:  # an optional piece missing: the child that needs it reports it
            pass


def default_jobs() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def zoo_sources(needed: list[str]) -> dict[str, tuple[str, ...]]:
    """The zoo entries to have, in build order: ``needed`` and the entries each is built from
    (``ZooEntry.needs``, e.g. vit-clip-tiny from clip-tiny), each with those it must wait for."""
    from prompttune import zoo

    out: dict[str, tuple[str, ...]] = {}

    def add(name: str) -> None:
        if name in out:
            return
        src = zoo.get(name).needs
        for m in src:
            add(m)
        out[name] = src

    for n in needed:
        add(n)
    return out


def run_demo(sections: list[str] | None = None, runs_dir: str = "runs/demo", seeds: int | None = None,
             jobs: int | None = None) -> int:
    """Every chosen section (default: all), its zoo entries built first, up to ``jobs`` child
    processes at once (default: the usable cores), then the combined report and verdicts."""
    import sys

    from prompttune import zoo
    from prompttune.sweep import plan

    available = globals()["sections"]()
    chosen = sections or list(available)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ConfigError(f"unknown demo section(s) {unknown}; valid: {', '.join(available)}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    jobs = jobs or default_jobs()
    root = Path(runs_dir)
    needs = {}
    for s in chosen:  # validate every section before any compute
        _, runs = plan(available[s], runs_dir=root / s, seeds=seeds)
        needs[s] = zoo_needs(runs)
    sources = zoo_sources([n for s in chosen for n in needs[s]])
    todo = [n for n in sources if not (zoo.get(n).built() and zoo.get(n).problem() is None)]
    py = [sys.executable, "-m", "prompttune"]
    from prompttune.cli import main as cli_main

    build = {n: ["zoo", "build", n] for n in todo}  # the same CLI call, in a fresh interpreter or a fork
    tasks = [_Task(f"zoo:{n}", [*py, *build[n]], root / "logs" / f"zoo-{n}.log",
                   tuple(f"zoo:{m}" for m in sources[n] if m in todo), fn=partial(cli_main, build[n])) for n in todo]
    for s in chosen:
        cmd = [sys.executable, "-m", "prompttune.demo", "--section", s, "--runs-dir", str(root / s)]
        if seeds is not None:
            cmd += ["--seeds", str(seeds)]
        tasks.append(_Task(s, cmd, root / "logs" / f"{s}.log", tuple(f"zoo:{n}" for n in needs[s] if n in todo),
                           fn=partial(run_section, s, str(root / s), seeds)))
    if can_fork():  # imported once here, inherited by every forked child
        _preimport()
    print(f"demo: {len(chosen)} section(s) ({', '.join(chosen)}); zoo entries to build: "
          f"{', '.join(todo) or 'none'}; {jobs} at a time, one thread each; logs in {root / 'logs'}", flush=True)
    t_all = time.perf_counter()
    sched = _Scheduler(tasks, jobs)
    stopped = sched.run()
    if stopped:
        print(f"demo interrupted; run the same command again to resume (finished runs and zoo builds are kept)",
              file=sys.stderr, flush=True)
        return stopped
    wall = time.perf_counter() - t_all
    status = exit_status(tasks)
    timings = {t.key: t.seconds for t in tasks}
    parts, verdicts = [], []
    for s in chosen:
        out = section_summary(s, root / s)
        body, ver_md, results = out["body"], out["verdicts_md"], out["claims"]
        verdicts += results
        parts.append(f"## {s}  ({timings[s]:.0f} s)\n\n{body}\n{ver_md}")
        if out["plot"]:
            parts.append(f"![{s}]({s}/report.png)\n")
        print(f"\n== {s} ({timings[s]:.0f} s)\n{body}\n{ver_md}", flush=True)
    builds = {k.removeprefix("zoo:"): round(v, 1) for k, v in timings.items() if k.startswith("zoo:")}
    summary = "## Verdicts\n\n" + verdict_markdown(verdicts) if verdicts else ""
    head = (f"# prompttune demo ({wall:.0f} s wall, {jobs} job(s); zoo builds: "
            + (", ".join(f"{k} {v:.0f} s" for k, v in builds.items()) or "none, all cached") + ")\n\n")
    atomic_write_text(root / "README.md", head + f"{summary}\n" + "\n".join(parts))
    atomic_write_json(root / "verdicts.json",
                      {"total_s": round(wall, 1), "jobs": jobs, "zoo_builds_s": builds,
                       "sections_s": {s: round(timings[s], 1) for s in chosen},
                       "claims": [{k: v for k, v in r.items()} for r in verdicts]})
    if verdicts:
        print("\n" + summary, flush=True)
    print(f"\ndemo finished in {wall:.0f} s ({jobs} job(s)); report: {root / 'README.md'}")
    return status


def section_summary(section: str, section_dir: Path, fresh: bool = False) -> dict[str, Any]:
    """A section's report body (tables, plot), its rows and claims markdown and its claim results.
    The section's child computes it once its runs are done (in parallel with the other sections)
    and leaves it in ``summary.json``, next to the runs it was computed from; the demo reads it
    there, or computes it when it is missing, unreadable or older than a run's record."""
    from prompttune.report import make_report

    path = section_dir / "summary.json"
    if not fresh and path.is_file() and path.stat().st_mtime >= max(
            (r.stat().st_mtime for r in section_dir.glob("*/result.json")), default=0.0):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    out = make_report(section_dir, allow_empty=True)
    body = out["markdown"].split("\n", 2)[2] if out["markdown"].startswith("# ") else out["markdown"]
    ver_md, results = section_verdicts(section, section_dir)
    summary = {"body": body, "plot": bool(out["plot"]), "verdicts_md": ver_md, "claims": results}
    if section_dir.is_dir():
        atomic_write_json(path, summary)
    return summary


def run_section(section: str, runs_dir: str, seeds: int | None = None) -> int:
    """One section's sweep, in this process (the demo runs each section as a child process), then
    its report and claims (:func:`section_summary`) when every run completed."""
    from prompttune.sweep import SweepInterrupted, run_sweep

    available = globals()["sections"]()
    try:
        rc = run_sweep(available[section], runs_dir=Path(runs_dir), seeds=seeds, report=False)
    except SweepInterrupted as stop:
        print(f"prompttune demo [{section}]: {stop}; interrupted", flush=True)
        return stop.exit_code
    if rc == 0:
        section_summary(section, Path(runs_dir), fresh=True)
    return rc


def claims_as_dicts() -> list[dict[str, Any]]:
    return [asdict(c) for c in CLAIMS]


def verdicts_of(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Recompute every claim from an existing demo's runs (no training)."""
    return [check_claim(c, Path(runs_dir) / c.section) for c in CLAIMS]


def _main() -> None:
    """``python -m prompttune.demo RUNS_DIR``: the verdict table of finished runs;
    ``python -m prompttune.demo --section NAME --runs-dir DIR [--seeds N]``: one section (a demo child)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m prompttune.demo")
    p.add_argument("runs_dir", nargs="?", default="runs/demo")
    p.add_argument("--section", default=None)
    p.add_argument("--runs-dir", dest="section_dir", default=None)
    p.add_argument("--seeds", type=int, default=None)
    args = p.parse_args()
    if args.section:
        sys.exit(run_section(args.section, args.section_dir or str(Path(args.runs_dir) / args.section), args.seeds))
    res = verdicts_of(args.runs_dir)
    print(verdict_markdown(res))
    print(json.dumps([{k: r[k] for k in ("claim", "verdict")} for r in res], indent=1))


if __name__ == "__main__":
    _main()
