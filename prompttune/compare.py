"""``prompttune compare``: the paired difference between two settings of finished runs.

A *setting* is a group of runs whose tags (their grid keys and values) are equal, one run per
seed. ``A`` and ``B`` name one setting each by ``key=value`` filters (``method=inmemo,lr=40``: a key
is a tag key or its last dotted part, a value matches as text, as YAML or as a number); where several
settings include the filter, the only one with the fewest other tags is meant (the full method
over its ablation variants, which add a key), else it is an error. ``seed=N`` on both sides
compares one seed's runs. The two are paired
by seed and test item (each run's ``test_items.json``; a frozen setting with one run is paired with
every seed of the other) and the mean difference A - B gets a 95 % bootstrap interval over seeds
and test items (:mod:`prompttune.stats`), with the verdict for "A > B". The demo's claims
(:mod:`prompttune.demo`) use the same selection and maths.

    prompttune compare runs/ablation-icl-recipe "method=inmemo,lr=40" method=no_prompt --metric test/miou
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prompttune import stats
from prompttune.config import ConfigError

# metrics in [0, 1] are shown in percent, as the papers do
_PERCENT = ("acc", "miou", "vqa_acc", "transfer_acc")


def scale_of(metric: str) -> float:
    key = metric.removeprefix("test/")
    return 100.0 if key.startswith(_PERCENT) or "R@" in key else 1.0


def records(runs_dir: Path) -> list[dict[str, Any]]:
    """The completed runs under ``runs_dir`` (their ``result.json`` records, with ``_dir``)."""
    from prompttune.report import collect

    done, _ = collect(runs_dir) if Path(runs_dir).is_dir() else ([], [])
    return done


def parse_filter(text: str, what: str = "A") -> dict[str, str]:
    """``"method=inmemo,method.optim.lr=40"`` -> ``{"method": "inmemo", "method.optim.lr": "40"}``."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",")):
        key, eq, value = part.partition("=")
        if not part or not eq or not key.strip() or not value.strip():
            raise ConfigError(f"{what}={text!r}: expected key=value pairs separated by commas "
                              f"(e.g. 'method=inmemo,method.optim.lr=40'), got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _tags(rec: dict[str, Any]) -> dict[str, Any]:
    tags = dict(rec.get("tags") or {})
    tags.setdefault("method", rec.get("method"))
    return tags


def _same_value(have: Any, want: Any) -> bool:
    """A tag's value against a filter's text: as text, as YAML (``false``, ``null``, ``[zoo_clip]``)
    or as a number (``40`` is ``40.0``, ``1e-12`` is ``1.0e-12``)."""
    if str(have) == str(want):
        return True
    import yaml

    try:
        parsed = yaml.safe_load(str(want))
    except yaml.YAMLError:
        parsed = want
    if isinstance(have, bool) or isinstance(parsed, bool) or have is None or parsed is None:
        return have is parsed
    if parsed == have:
        return True
    try:
        return float(have) == float(want)
    except (TypeError, ValueError):
        return False


def _key_matches(tag_key: str, key: str) -> bool:
    return tag_key == key or tag_key.endswith("." + key)


def matches(rec: dict[str, Any], want: dict[str, Any]) -> bool:
    """Every ``key=value`` of ``want`` is one of the run's tags (a key may be a tag key's last dotted
    part); ``seed=N`` keeps that seed's run only."""
    tags = _tags(rec)
    return all(_same_value(rec.get("seed", 0), value) if key == "seed"
               else any(_key_matches(k, key) and _same_value(v, value) for k, v in tags.items())
               for key, value in want.items())


def setting_name(rec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(_tags(rec).items()))


def select(recs: list[dict[str, Any]], want: dict[str, Any], what: str = "A") -> list[dict[str, Any]]:
    """The runs of the one setting ``want`` names: the only one whose tags include it, or among
    several the only one with the fewest other tags (``method=dual_prompt`` picks the full method
    over its ablation variants, which add a key). A ConfigError when it names none or several."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        if matches(r, want):
            groups.setdefault(setting_name(r), []).append(r)
    if not groups:
        have = sorted({setting_name(r) for r in recs})
        raise ConfigError(f"{what}={want}: no completed run has these tags; settings here: "
                          + ("; ".join(have) if have else "none"))
    if len(groups) > 1:  # the one with the fewest other tags, if only one has that few
        fewest = min(len(_tags(rs[0])) for rs in groups.values())
        least = [k for k, rs in groups.items() if len(_tags(rs[0])) == fewest]
        if len(least) == 1:
            return groups[least[0]]
        raise ConfigError(f"{what}={want} names {len(groups)} settings, one is needed (add a key): "
                          + "; ".join(sorted(groups)))
    return next(iter(groups.values()))


def scores_by_seed(recs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each run's per-item test scores (``test_items.json``), by seed."""
    out = {}
    for r in sorted(recs, key=lambda r: r.get("seed", 0)):
        items = stats.read_items(r["_dir"])
        if items is None:
            raise ValueError(f"{r['_dir']} has no test_items.json (rerun it: per-item scores are new)")
        out[int(r.get("seed", 0))] = items
    return out


def paired_rows(a: dict[int, dict], b: dict[int, dict], metric: str):
    """[runs, items] scores of A's runs then B's, rows paired by seed, and A's row count; a frozen
    B (one run) is paired with every seed of A."""
    common = sorted(set(a) & set(b))
    if len(b) == 1 and (len(a) > 1 or not common):
        return stats.aligned_scores([a[s] for s in sorted(a)] + list(b.values()), metric), len(a)
    if not common:
        raise ValueError(f"no common seeds to pair: {sorted(a)} vs {sorted(b)}")
    m = stats.aligned_scores([a[s] for s in common] + [b[s] for s in common], metric)
    return m, len(common)


def paired(sel_a: list[dict[str, Any]], sel_b: list[dict[str, Any]], metric: str,
           direction: str = "+") -> dict[str, Any]:
    """A - B over paired seeds and test items, its intervals, each side's mean and the verdict."""
    m, na = paired_rows(scores_by_seed(sel_a), scores_by_seed(sel_b), metric)
    sa, sb = m[:na], m[na:]
    d = stats.paired_difference(sa, sb if len(sb) == na else sb[:1])
    return {"verdict": stats.verdict(direction, d["ci"]), "scale": scale_of(metric),
            "a_mean": stats.mean_ci(sa), "b_mean": stats.mean_ci(sb), **d}


def compare(runs_dir: str | Path, a: str | dict, b: str | dict, metric: str | None = None,
            b_runs_dir: str | Path | None = None, direction: str = "+") -> dict[str, Any]:
    """The paired comparison of setting ``a`` (in ``runs_dir``) and ``b`` (in ``b_runs_dir``,
    default the same folder) on ``metric`` (default: A's first ``test/`` metric)."""
    want_a = parse_filter(a, "A") if isinstance(a, str) else dict(a)
    want_b = parse_filter(b, "B") if isinstance(b, str) else dict(b)
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"runs_dir={str(root)!r}: no such folder")
    if b_runs_dir is not None and not Path(b_runs_dir).is_dir():
        raise ConfigError(f"--b-runs-dir={str(b_runs_dir)!r}: no such folder")
    recs_a = records(root)
    recs_b = recs_a if b_runs_dir is None else records(Path(b_runs_dir))
    sel_a, sel_b = select(recs_a, want_a, "A"), select(recs_b, want_b, "B")
    if metric is None:
        metric = next((k for k in (sel_a[0].get("metrics") or {}) if k.startswith("test/")), None)
        if metric is None:
            raise ConfigError(f"A={want_a}: its runs recorded no test/ metric; pass --metric")
    try:
        out = paired(sel_a, sel_b, metric, direction)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"A={want_a}, B={want_b}, metric {metric!r}: cannot be paired: {err}") from None
    return {"a": setting_name(sel_a[0]), "b": setting_name(sel_b[0]), "metric": metric, **out}


def markdown(row: dict[str, Any]) -> str:
    s = row["scale"]
    k = 2 if s != 1.0 else 3  # points for percentages, three decimals for rsum, CIDEr, ...
    a, b = row["a_mean"], row["b_mean"]
    seeds = stats.fmt_ci(row["ci_seeds"], s, k) if row.get("ci_seeds") else "n/a (one seed)"

    def line(name, m):
        return f"| {name} | {m['mean'] * s:.{k}f} | [{m['ci'][0] * s:.{k}f}, {m['ci'][1] * s:.{k}f}] | {m['n_seeds']} |"

    return "\n".join([
        f"| setting | {row['metric']} | 95 % CI (seeds × test items) | seeds |", "|---|---|---|---|",
        line(f"A: {row['a']}", a), line(f"B: {row['b']}", b), "",
        f"A − B = {row['diff'] * s:+.{k}f} {stats.fmt_ci(row['ci'], s, k)} (95 % CI over seeds and test items; "
        f"items only {stats.fmt_ci(row['ci_items'], s, k)}, seeds only {seeds}; "
        f"{row['n_seeds']} seed(s) × {row['n_items']} items): A > B **{row['verdict']}**",
    ]) + "\n"
