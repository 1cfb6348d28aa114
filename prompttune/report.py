"""Run records -> tables and plots (``report.md``, ``report.csv``, ``report.png``).

Tables come from ``result.json`` records only, never from logs. Runs are grouped by their
grid point (the ``tags`` a sweep records; method/backbone/data otherwise); every metric is
shown as mean ± std over seeds (sample std, n-1). Runs without a completed record are
listed as incomplete or failed and left out of the numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from prompttune.utils import atomic_write_text

COST_COLUMNS = (("trainable_params", "trainable params"), ("total_params", "total params"),
                ("train_time_s", "train time (s)"), ("samples_per_s", "samples/s"), ("peak_mem_mb", "peak mem (MB)"))


def collect(runs_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(completed records, other runs with their state) under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory not found: {runs_dir}")
    done, other = [], []
    dirs = sorted({p.parent for p in runs_dir.rglob("config.yaml")} | {p.parent for p in runs_dir.rglob("result.json")})
    for d in dirs:
        f = d / "result.json"
        rec = None
        if f.is_file():
            try:
                rec = json.loads(f.read_text())
            except (json.JSONDecodeError, OSError):
                other.append({"dir": str(d), "state": "unreadable result.json"})
                continue
        if rec and rec.get("status") == "completed":
            rec["_dir"] = str(d)
            done.append(rec)
        elif rec:
            other.append({"dir": str(d), "state": rec.get("status", "?"), "error": rec.get("error", "")})
        else:
            other.append({"dir": str(d), "state": "incomplete"})
    return done, other


def _group_key(rec: dict) -> tuple:
    tags = rec.get("tags") or {}
    if tags:
        return tuple(sorted((k, _fmt_value(v)) for k, v in tags.items()))
    return (("method", rec.get("method")), ("backbone", rec.get("backbone")), ("data", rec.get("data")))


def _fmt_value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def summarize(records: list[dict]) -> tuple[list[str], list[str], list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec), []).append(rec)
    keys: list[str] = []
    for g in groups:
        for k, _ in g:
            if k not in keys:
                keys.append(k)
    metrics = sorted({m for r in records for m in r.get("metrics", {})})
    rows = []
    for g, recs in groups.items():
        row: dict[str, Any] = dict(g)
        row["seeds"] = len(recs)
        for m in metrics:
            row[m] = mean_std([r["metrics"][m] for r in recs if m in r.get("metrics", {})])
        for c, _ in COST_COLUMNS:
            vals = [r[c] for r in recs if isinstance(r.get(c), (int, float))]
            row[c] = sum(vals) / len(vals) if vals else float("nan")
        rows.append(row)
    rows.sort(key=lambda r: tuple(_sortable(r.get(k)) for k in keys))
    return keys, metrics, rows


def _sortable(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _pct(metric: str) -> bool:
    return any(s in metric for s in ("acc", "recall", "R@", "miou", "iou"))


def _fmt_ms(ms: tuple[float, float], pct: bool) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    return f"{100 * m:.2f} ± {100 * s:.2f}" if pct else f"{m:.4f} ± {s:.4f}"


def _fmt_cost(c: str, v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if c.endswith("params"):
        return f"{int(v):,}"
    return f"{v:.1f}" if c != "samples_per_s" else f"{v:.0f}"


def markdown_table(keys: list[str], metrics: list[str], rows: list[dict]) -> str:
    head = [*keys, "seeds", *[f"{m} (%)" if _pct(m) else m for m in metrics], *[n for _, n in COST_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [str(r.get(k, "")) for k in keys] + [str(r["seeds"])]
        cells += [_fmt_ms(r[m], _pct(m)) for m in metrics]
        cells += [_fmt_cost(c, r[c]) for c, _ in COST_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(keys: list[str], metrics: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*keys, "seeds", *[x for m in metrics for x in (f"{m}_mean", f"{m}_std")], *[c for c, _ in COST_COLUMNS]])
    for r in rows:
        w.writerow([r.get(k, "") for k in keys] + [r["seeds"]] + [x for m in metrics for x in r[m]]
                   + [r[c] for c, _ in COST_COLUMNS])
    return buf.getvalue()


def series_label(row: dict, keys: list[str]) -> str:
    """'coop, lr=0.5': the method's name bare, other keys as short=value; keys a row lacks are skipped."""
    parts = []
    for k in keys:
        if row.get(k) is None:
            continue
        parts.append(str(row[k]) if k == "method" else f"{k.split('.')[-1]}={row[k]}")
    return ", ".join(parts)


def plot(path: Path, keys: list[str], metric: str, rows: list[dict], x: str | None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if metric in r and not math.isnan(r[metric][0])]
    if not rows:
        return False
    scale = 100 if _pct(metric) else 1
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if x and x in keys and all(isinstance(r.get(x), (int, float)) for r in rows):
        others = [k for k in keys if k != x]
        series: dict[str, list] = {}
        for r in rows:
            label = series_label(r, others) or metric
            series.setdefault(label, []).append(r)
        for label, rs in series.items():
            rs.sort(key=lambda r: r[x])
            ax.errorbar([r[x] for r in rs], [scale * r[metric][0] for r in rs], yerr=[scale * r[metric][1] for r in rs],
                        marker="o", capsize=3, label=label)
        ax.set_xlabel(x)
        if all(r[x] > 0 for r in rows) and max(r[x] for r in rows) / max(min(r[x] for r in rows), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    else:
        labels = [series_label(r, keys) for r in rows]
        ax.bar(range(len(rows)), [scale * r[metric][0] for r in rows], yerr=[scale * r[metric][1] for r in rows],
               capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric + (" (%)" if scale == 100 else ""))
    ax.grid(alpha=0.3)
    ax.set_title(f"{metric}: mean ± std over seeds")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def make_report(runs_dir: str | Path, metric: str | None = None, x: str | None = None) -> dict[str, Any]:
    runs_dir = Path(runs_dir)
    sweep_file = runs_dir / "sweep.json"
    if sweep_file.is_file():  # the sweep's own report settings are the defaults
        settings = json.loads(sweep_file.read_text()).get("report", {})
        metric, x = metric or settings.get("metric"), x or settings.get("x")
    done, other = collect(runs_dir)
    keys, metrics, rows = summarize(done)
    metric = metric or (metrics[0] if metrics else None)
    md = [f"# Report: {runs_dir}", "", f"{len(done)} completed runs, {len(rows)} settings; "
          "metrics are mean ± std over seeds (sample std).", ""]
    md.append(markdown_table(keys, metrics, rows) if rows else "_no completed runs_")
    if other:
        md += ["", f"## Not in the table ({len(other)} runs)", ""]
        md += [f"- `{o['dir']}`: {o['state']}" + (f" — {o['error']}" if o.get("error") else "") for o in other]
    text = "\n".join(md) + "\n"
    atomic_write_text(runs_dir / "report.md", text)
    atomic_write_text(runs_dir / "report.csv", csv_text(keys, metrics, rows))
    png = runs_dir / "report.png"
    has_plot = bool(metric) and plot(png, keys, metric, rows, x)
    return {"markdown": text, "rows": rows, "keys": keys, "metrics": metrics, "incomplete": other,
            "plot": str(png) if has_plot else None}
