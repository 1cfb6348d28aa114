"""Paired differences between two methods with 95 % confidence intervals, and verdicts.

Two sources of uncertainty make a measured gap between methods A and B differ from the true one:

* **seeds** (the few-shot draw, the initialisation, the data order): runs of A and B with the
  same seed are paired;
* **test items** (which images / episodes / captions the test split happens to hold): both
  methods are scored on the *same* items, so the per-item differences are paired too.

Each run writes its per-item test scores (``test_items.json``; the mean of a metric's per-item
scores is the metric). :func:`paired_difference` takes them as arrays ``[seeds, items]`` and
returns the mean difference with three 95 % intervals:

* ``ci``: a two-level (hierarchical) percentile bootstrap: resample seeds, then items, the same
  items for both methods -- both sources at once; this is what :func:`verdict` reads;
* ``ci_items``: items only (the seed-averaged per-item differences, bootstrapped);
* ``ci_seeds``: seeds only (Student t over per-seed mean differences; None with one seed).

A frozen method (zero-shot, no prompt) has one run whatever the seed: its items are paired with
every seed of the other method. Its own row shows its *test-sampling* interval (:func:`mean_ci`),
never "± 0.00". With one or two seeds the seed level of the bootstrap is coarse (it cannot see
more spread than the seeds showed); ``n_seeds`` is reported beside every interval for that reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

N_BOOT = 2000
# two-sided 97.5 % quantiles of Student's t for df = 1..30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def _as_matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be per-item scores [items] or [seeds, items], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite per-item scores")
    return a


def _bootstrap_means(d: np.ndarray, n_boot: int, rng: np.random.Generator, seeds: bool = True) -> np.ndarray:
    """[n_boot] means of ``d`` [S, N] over resampled seeds (if ``seeds``) and resampled items."""
    s, n = d.shape
    out = np.empty(n_boot)
    chunk = max(1, int(2e6 // max(n, 1)))  # keep the [chunk, N] count matrix small (~16 MB)
    for lo in range(0, n_boot, chunk):
        b = min(chunk, n_boot - lo)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b)  # item resampling as counts
        per_seed = counts @ d.T / n  # [b, S]
        if seeds and s > 1:
            pick = rng.integers(0, s, size=(b, s))
            out[lo:lo + b] = np.take_along_axis(per_seed, pick, 1).mean(1)
        else:
            out[lo:lo + b] = per_seed.mean(1)
    return out


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def mean_ci(scores: Any, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Mean of one method's per-item scores [seeds, items] with its 95 % bootstrap interval
    (seeds and items resampled; with one seed: the test-sampling interval)."""
    a = _as_matrix(scores, "scores")
    rng = np.random.default_rng(seed)
    lo, hi = _percentile_ci(_bootstrap_means(a, n_boot, rng))
    return {"mean": float(a.mean()), "ci": (lo, hi), "n_seeds": a.shape[0], "n_items": a.shape[1]}


def paired_difference(a: Any, b: Any, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Mean of A - B over paired seeds and items, with 95 % intervals (see the module docstring).

    ``a``, ``b``: per-item scores [seeds, items] (or [items] for one run), rows paired by seed;
    a single row on either side (a frozen method) is paired with every row of the other.
    """
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the methods were scored on different test sets: {a.shape[1]} vs {b.shape[1]} items")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"seeds cannot be paired: {a.shape[0]} runs of A vs {b.shape[0]} of B")
    d = a - b  # broadcasts a frozen method's single row
    rng = np.random.default_rng(seed)
    ci = _percentile_ci(_bootstrap_means(d, n_boot, rng, seeds=True))
    ci_items = _percentile_ci(_bootstrap_means(d.mean(0, keepdims=True), n_boot, rng, seeds=False))
    per_seed = d.mean(1)
    ci_seeds = None
    if len(per_seed) > 1:
        half = t975(len(per_seed) - 1) * per_seed.std(ddof=1) / math.sqrt(len(per_seed))
        ci_seeds = (float(per_seed.mean() - half), float(per_seed.mean() + half))
    return {"diff": float(d.mean()), "ci": ci, "ci_items": ci_items, "ci_seeds": ci_seeds,
            "per_seed": [float(x) for x in per_seed], "n_seeds": d.shape[0], "n_items": d.shape[1]}


def verdict(direction: str, ci: Sequence[float]) -> str:
    """``direction`` "+" (the paper says A > B) or "-" (A < B) against the interval of A - B."""
    if direction not in ("+", "-"):
        raise ValueError(f"direction must be '+' or '-', not {direction!r}")
    lo, hi = float(ci[0]), float(ci[1])
    if lo > 0:
        return "holds" if direction == "+" else "reversed"
    if hi < 0:
        return "holds" if direction == "-" else "reversed"
    return "inconclusive"


# ------------------------------------------------------------------ run records
def read_items(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``test_items.json`` (None when it has none)."""
    path = Path(run_dir) / "test_items.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise ValueError(f"{path}: not a test_items.json (expected {{'n', 'index', 'scores'}})")
    return data


def aligned_scores(item_records: Sequence[dict[str, Any]], metric: str) -> np.ndarray:
    """[runs, items] scores of ``metric`` (``test/`` prefix optional), rows aligned on the item
    index when the runs recorded one (so evaluation order never pairs the wrong items)."""
    key = metric.removeprefix("test/")
    rows, indices = [], []
    for rec in item_records:
        if key not in rec["scores"]:
            raise KeyError(f"per-item scores hold no {key!r}; they have {sorted(rec['scores'])}")
        vals = np.asarray(rec["scores"][key], dtype=np.float64)
        idx = rec.get("index")
        if idx is not None and len(idx) == len(vals):
            order = np.argsort(np.asarray(idx), kind="stable")
            vals = vals[order]
            indices.append(np.asarray(idx)[order])
        else:
            indices.append(None)
        rows.append(vals)
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"runs scored different numbers of test items: {[len(r) for r in rows]}")
    known = [i for i in indices if i is not None]
    if any(not np.array_equal(known[0], i) for i in known[1:]):
        raise ValueError("runs were scored on different test items (their indices differ)")
    return np.stack(rows)


def fmt_ci(ci: Sequence[float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if ci is None:
        return "n/a"
    return f"[{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]"
