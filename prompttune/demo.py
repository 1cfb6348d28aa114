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
from pathlib import Path
from typing import Any

from prompttune import stats
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
    Claim("vpt", "SPT (Wang et al., ICML 2024)", {"method": "spt_deep"}, {"method": "vpt_deep"}, "test/acc"),
    Claim("icl", "E-InMeMo (J. Imaging 2025)", {"method": "e_inmemo"}, {"method": "inmemo"}, "test/miou"),
    Claim("icl", "InMeMo (WACV 2024)", {"method": "inmemo"}, {"method": "no_prompt"}, "test/miou"),
    Claim("mmict", "MMICT (arXiv 2312.06363)", {"method": "mhub"}, {"method": "vanilla_ict"}, "test/cider"),
    Claim("mmict", "MMICT (arXiv 2312.06363)", {"method": "mhub"}, {"method": "ft_qformer"}, "test/cider"),
    Claim("tvp", "TVP (Zhang et al., CVPR 2024)", {"method": "tvp"}, {"method": "vp"}, "test/acc",
          note="on the source model; transfer to other models: `prompttune transfer experiments/tvp_transfer.yaml`"),
)

# metrics in [0, 1] are shown in percent, as the papers do
_PERCENT = ("acc", "miou", "vqa_acc", "R@")


def scale_of(metric: str) -> float:
    key = metric.removeprefix("test/")
    return 100.0 if key.startswith(_PERCENT[:3]) or "R@" in key else 1.0


def sections() -> dict[str, Path]:
    found = {p.stem.removeprefix("demo_"): p for p in sorted((repo_root() / "experiments").glob("demo_*.yaml"))}
    return dict(sorted(found.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


# ------------------------------------------------------------------ verdicts
def _records(section_dir: Path) -> list[dict[str, Any]]:
    from prompttune.report import collect

    done, _ = collect(section_dir) if section_dir.is_dir() else ([], [])
    return done


def _matches(rec: dict[str, Any], want: dict[str, Any]) -> bool:
    tags = rec.get("tags") or {}
    have = {**tags, "method": tags.get("method", rec.get("method"))}
    return all(str(have.get(k)) == str(v) for k, v in want.items())


def _scores_by_seed(recs: list[dict[str, Any]], metric: str) -> dict[int, dict[str, Any]]:
    out = {}
    for r in sorted(recs, key=lambda r: r.get("seed", 0)):
        items = stats.read_items(r["_dir"])
        if items is None:
            raise ValueError(f"{r['_dir']} has no test_items.json (rerun it: per-item scores are new)")
        out[int(r.get("seed", 0))] = items
    return out


def _paired_rows(a: dict[int, dict], b: dict[int, dict], metric: str):
    common = sorted(set(a) & set(b))
    if len(b) == 1 and (len(a) > 1 or not common):  # a frozen baseline: pair its one run with every seed
        return stats.aligned_scores([a[s] for s in sorted(a)] + list(b.values()), metric), len(a)
    if not common:
        raise ValueError(f"no common seeds to pair: {sorted(a)} vs {sorted(b)}")
    m = stats.aligned_scores([a[s] for s in common] + [b[s] for s in common], metric)
    return m, len(common)


def check_claim(claim: Claim, section_dir: Path) -> dict[str, Any]:
    recs = _records(section_dir)
    row: dict[str, Any] = {"section": claim.section, "paper": claim.paper, "claim": claim.label,
                           "metric": claim.metric, "direction": claim.direction, "note": claim.note}
    sel_a = [r for r in recs if _matches(r, {**claim.tags, **claim.a})]
    sel_b = [r for r in recs if _matches(r, {**claim.tags, **claim.b})]
    if not sel_a or not sel_b:
        return {**row, "verdict": "not run", "why": f"runs found: A {len(sel_a)}, B {len(sel_b)}"}
    try:
        a, b = _scores_by_seed(sel_a, claim.metric), _scores_by_seed(sel_b, claim.metric)
        m, na = _paired_rows(a, b, claim.metric)
    except (ValueError, KeyError) as err:
        return {**row, "verdict": "not measurable", "why": str(err)}
    sa, sb = m[:na], m[na:]
    d = stats.paired_difference(sa, sb if len(sb) == na else sb[:1])
    scale = scale_of(claim.metric)
    return {**row, "verdict": stats.verdict(claim.direction, d["ci"]), "scale": scale,
            "a_mean": stats.mean_ci(sa), "b_mean": stats.mean_ci(sb), **d}


def method_rows(section_dir: Path, metric: str) -> list[dict[str, Any]]:
    """Each grid point's mean with its 95 % interval over seeds and test items."""
    groups: dict[str, list[dict]] = {}
    for r in _records(section_dir):
        key = ", ".join(f"{k}={v}" for k, v in sorted((r.get("tags") or {"method": r["method"]}).items()))
        groups.setdefault(key, []).append(r)
    rows = []
    for key, recs in sorted(groups.items()):
        try:
            by_seed = _scores_by_seed(recs, metric)
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


def run_demo(sections: list[str] | None = None, runs_dir: str = "runs/demo", seeds: int | None = None) -> int:
    from prompttune.sweep import plan, run_sweep

    available = globals()["sections"]()
    chosen = sections or list(available)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ConfigError(f"unknown demo section(s) {unknown}; valid: {', '.join(available)}")
    for s in chosen:  # validate every section before any compute
        plan(available[s], runs_dir=Path(runs_dir) / s, seeds=seeds)
    parts, status, timings, verdicts = [], 0, {}, []
    t_all = time.perf_counter()
    for i, s in enumerate(chosen):
        t0 = time.perf_counter()
        print(f"\n== demo section {i + 1}/{len(chosen)}: {s} ({available[s].name}); "
              f"{time.perf_counter() - t_all:.0f} s so far", flush=True)
        status |= run_sweep(available[s], runs_dir=Path(runs_dir) / s, seeds=seeds, report=False)
        from prompttune.report import make_report

        out = make_report(Path(runs_dir) / s, allow_empty=True)
        timings[s] = time.perf_counter() - t0
        body = out["markdown"].split("\n", 2)[2] if out["markdown"].startswith("# ") else out["markdown"]
        ver_md, results = section_verdicts(s, Path(runs_dir) / s)
        verdicts += results
        parts.append(f"## {s}  ({timings[s]:.0f} s)\n\n{body}\n{ver_md}")
        if out["plot"]:
            parts.append(f"![{s}]({s}/report.png)\n")
        print(f"\n== {s} ({timings[s]:.0f} s)\n{body}\n{ver_md}", flush=True)
    total = sum(timings.values())
    summary = "## Verdicts\n\n" + verdict_markdown(verdicts) if verdicts else ""
    atomic_write_text(Path(runs_dir) / "README.md",
                      f"# prompttune demo ({total:.0f} s)\n\n{summary}\n" + "\n".join(parts))
    atomic_write_json(Path(runs_dir) / "verdicts.json",
                      {"total_s": round(total, 1), "sections_s": {k: round(v, 1) for k, v in timings.items()},
                       "claims": [{k: v for k, v in r.items()} for r in verdicts]})
    if verdicts:
        print("\n" + summary, flush=True)
    print(f"\ndemo finished in {total:.0f} s; report: {Path(runs_dir) / 'README.md'}")
    return status


def claims_as_dicts() -> list[dict[str, Any]]:
    return [asdict(c) for c in CLAIMS]


def verdicts_of(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Recompute every claim from an existing demo's runs (no training)."""
    return [check_claim(c, Path(runs_dir) / c.section) for c in CLAIMS]


def _main() -> None:  # python -m prompttune.demo RUNS_DIR: the verdict table of finished runs
    import sys

    res = verdicts_of(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    print(verdict_markdown(res))
    print(json.dumps([{k: r[k] for k in ("claim", "verdict")} for r in res], indent=1))


if __name__ == "__main__":
    _main()
