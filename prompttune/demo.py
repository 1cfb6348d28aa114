"""``prompttune demo``: the embedded default comparison, offline.

Each section is a sweep file ``experiments/demo_<section>.yaml`` run into
``<runs_dir>/<section>/`` (zoo backbones are built on first use, synthetic data is
generated on first use); the section reports are gathered into ``<runs_dir>/README.md``.
Rerunning skips what is already done.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prompttune.config import ConfigError, repo_root
from prompttune.utils import atomic_write_text

log = logging.getLogger("prompttune")
ORDER = ("clip", "retrieval", "vpt", "icl", "mmict", "tvp")


def sections() -> dict[str, Path]:
    found = {p.stem.removeprefix("demo_"): p for p in sorted((repo_root() / "experiments").glob("demo_*.yaml"))}
    return dict(sorted(found.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


def run_demo(sections: list[str] | None = None, runs_dir: str = "runs/demo", seeds: int | None = None) -> int:
    from prompttune.sweep import plan, run_sweep

    available = globals()["sections"]()
    chosen = sections or list(available)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ConfigError(f"unknown demo section(s) {unknown}; valid: {', '.join(available)}")
    for s in chosen:  # validate every section before any compute
        plan(available[s], runs_dir=Path(runs_dir) / s, seeds=seeds)
    parts, status, timings = [], 0, {}
    for s in chosen:
        t0 = time.perf_counter()
        log.info("== demo section %s (%s)", s, available[s].name)
        status |= run_sweep(available[s], runs_dir=Path(runs_dir) / s, seeds=seeds, report=False)
        from prompttune.report import make_report

        out = make_report(Path(runs_dir) / s)
        timings[s] = time.perf_counter() - t0
        body = out["markdown"].split("\n", 2)[2] if out["markdown"].startswith("# ") else out["markdown"]
        parts.append(f"## {s}  ({timings[s]:.0f} s)\n\n{body}")
        if out["plot"]:
            parts.append(f"![{s}]({s}/report.png)\n")
        print(f"\n== {s} ({timings[s]:.0f} s)\n{body}")
    total = sum(timings.values())
    atomic_write_text(Path(runs_dir) / "README.md", f"# prompttune demo ({total:.0f} s)\n\n" + "\n".join(parts))
    print(f"\ndemo finished in {total:.0f} s; report: {Path(runs_dir) / 'README.md'}")
    return status
