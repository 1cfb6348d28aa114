"""Run records -> tables and plots (``report.md``, ``report.csv``, ``report.png``).

Tables come from ``result.json`` records only, never from logs. Runs are grouped by their
resolved config minus the seed and the keys that only name, place or log a run (run_dir,
run_name, runs_root, wandb, tags, ...; :func:`prompttune.runs.identity`), read from each run's
``config.yaml``: two runs share a row only when they differ in nothing but the seed, whatever
their tags say. The columns are the config keys that tell the rows apart, plus the reporting
protocol (``select``) of each row. A row where one seed appears twice is flagged. Every metric
is shown as mean ± std over seeds (sample std, n-1). Runs without a completed record are listed
as incomplete or failed and left out of the numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from prompttune.config import ConfigError
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


GROUP_CHOICES = ("method", "backbone", "data", "task", "trainer")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def setting_of(rec: dict) -> dict[str, Any]:
    """What a run's row is keyed by: its resolved config minus the seed and the run-identity keys,
    flattened (``method.optim.lr``), with ``choices.method`` shown as ``method``. A run directory
    without a readable config falls back to the record's method/backbone/data and tags."""
    cfg = None
    f = Path(rec.get("_dir", "")) / "config.yaml"
    if f.is_file():
        try:
            import yaml

            cfg = yaml.safe_load(f.read_text())
        except Exception:  # noqa: BLE001 -- a torn config: use the record instead
            cfg = None
    if isinstance(cfg, dict) and isinstance(cfg.get("choices"), dict):
        from prompttune.runs import identity

        flat = _flatten(identity(cfg, drop_seed=True))
        for g in GROUP_CHOICES:
            if f"choices.{g}" in flat:
                flat[g] = flat.pop(f"choices.{g}")
        flat = {k: _fmt_value(v) for k, v in flat.items() if not k.startswith("choices.")}
        return {g: flat.pop(g) for g in GROUP_CHOICES if g in flat} | flat
    base = {"method": rec.get("method"), "backbone": rec.get("backbone"), "data": rec.get("data")}
    return base | {k: _fmt_value(v) for k, v in (rec.get("tags") or {}).items()}


def _group_key(setting: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in setting.items()))


def shown_keys(settings: list[dict[str, Any]]) -> list[str]:
    """The keys that tell rows apart: a group choice (``method``) that varies, and any other key that
    varies between rows sharing the choice it belongs to (``method.n_ctx`` among the CoOp rows, not
    the keys that merely come with another method's config). ``method`` is always shown."""
    keys: list[str] = []
    for s in settings:
        keys += [k for k in s if k not in keys]
    shown = []
    for k in keys:
        owner = k.split(".")[0] if "." in k and k.split(".")[0] in GROUP_CHOICES else None
        parts: dict[Any, set] = {}
        for s in settings:
            parts.setdefault(s.get(owner) if owner else None, set()).add(repr(s.get(k, "<absent>")))
        if k == "method" or any(len(v) > 1 for v in parts.values()):
            shown.append(k)
    return shown


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
    settings: dict[tuple, dict] = {}
    for rec in records:
        setting = setting_of(rec)
        key = _group_key(setting)
        settings.setdefault(key, setting)
        groups.setdefault(key, []).append(rec)
    keys = shown_keys(list(settings.values()))
    metrics = sorted({m for r in records for m in r.get("metrics", {})})
    rows = []
    for g, recs in groups.items():
        row: dict[str, Any] = {k: settings[g].get(k) for k in keys}
        row["select"] = "/".join(sorted({str(r.get("select") or "last") for r in recs}))
        row["seeds"] = len(recs)
        seeds = [r.get("seed") for r in recs]
        row["duplicate_seeds"] = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        row["_dirs"] = [r.get("_dir") for r in recs]
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


def _fmt_ms(ms: tuple[float, float], pct: bool, seeds: int = 1) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    if seeds > 1 and s == 0:  # a frozen method: seeds change nothing, "± 0.00" would hide its test-sampling noise
        return f"{100 * m:.2f} (seed-free)" if pct else f"{m:.4f} (seed-free)"
    return f"{100 * m:.2f} ± {100 * s:.2f}" if pct else f"{m:.4f} ± {s:.4f}"


def _fmt_cost(c: str, v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if c.endswith("params"):
        return f"{int(v):,}"
    return f"{v:.1f}" if c != "samples_per_s" else f"{v:.0f}"


def markdown_table(keys: list[str], metrics: list[str], rows: list[dict]) -> str:
    head = [*keys, "select", "seeds", *[f"{m} (%)" if _pct(m) else m for m in metrics],
            *[n for _, n in COST_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        dup = f" ⚠ duplicate seed {', '.join(map(str, r['duplicate_seeds']))}" if r.get("duplicate_seeds") else ""
        cells = [str(r.get(k, "")) for k in keys] + [r.get("select", "last"), f"{r['seeds']}{dup}"]
        cells += [_fmt_ms(r[m], _pct(m), int(r['seeds'])) for m in metrics]
        cells += [_fmt_cost(c, r[c]) for c, _ in COST_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(keys: list[str], metrics: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*keys, "select", "seeds", "duplicate_seeds", *[x for m in metrics for x in (f"{m}_mean", f"{m}_std")],
                *[c for c, _ in COST_COLUMNS]])
    for r in rows:
        w.writerow([r.get(k, "") for k in keys] + [r.get("select", "last"), r["seeds"],
                                                    " ".join(map(str, r.get("duplicate_seeds") or []))]
                   + [x for m in metrics for x in r[m]]
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
    curve = bool(x and x in keys and all(isinstance(r.get(x), (int, float)) for r in rows))
    # one horizontal bar per row otherwise: long setting labels stay readable on their own lines
    fig, ax = plt.subplots(figsize=(7, 4.2) if curve else (8, 1.2 + 0.32 * len(rows)), dpi=110)
    if curve:
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
        ax.barh(range(len(rows)), [scale * r[metric][0] for r in rows], xerr=[scale * r[metric][1] for r in rows],
                capsize=3, color="tab:blue")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()  # the table's order, top to bottom
    (ax.set_ylabel if curve else ax.set_xlabel)(metric + (" (%)" if scale == 100 else ""))
    ax.grid(alpha=0.3)
    ax.set_title(f"{metric}: mean ± std over seeds", fontsize=10, loc="center" if curve else "right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def make_report(runs_dir: str | Path, metric: str | None = None, x: str | None = None,
                allow_empty: bool = False) -> dict[str, Any]:
    """Write report.md, report.csv and report.png under ``runs_dir``. An explicit ``metric`` or
    ``x`` that no run has is a :class:`ConfigError` naming the ones that exist; the sweep's own
    settings (sweep.json) only fall back. A report.png that cannot be redrawn is removed, and the
    report says so, so a stale plot never sits beside a new table."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ConfigError(f"runs folder {runs_dir} " + ("is a file" if runs_dir.exists() else "does not exist")
                          + "; name the folder a sweep wrote (its sweep.runs_dir) or that holds run folders")
    done, other = collect(runs_dir)
    if not done and not other and not allow_empty:  # `prompttune report` on the wrong folder
        raise ConfigError(f"no runs under {runs_dir}: no folder there holds a config.yaml or result.json; "
                          "name the folder a sweep wrote (its sweep.runs_dir)")
    keys, metrics, rows = summarize(done)
    if metric is not None and metrics and metric not in metrics:
        raise ConfigError(f"--metric {metric!r} is not a metric of the runs under {runs_dir}; "
                          f"metrics there: {', '.join(metrics)}")
    if x is not None and rows and x not in keys:
        raise ConfigError(f"--x {x!r} is not a key that varies between the rows under {runs_dir}; "
                          f"keys that do: {', '.join(keys)}")
    notes = []
    sweep_file = runs_dir / "sweep.json"
    if sweep_file.is_file():  # the sweep's own report settings are the defaults
        try:
            settings = json.loads(sweep_file.read_text()).get("report", {})
        except (json.JSONDecodeError, OSError):
            settings = {}
        if metric is None and settings.get("metric"):
            if settings["metric"] in metrics or not metrics:
                metric = settings["metric"]
            else:
                notes.append(f"sweep report.metric {settings['metric']!r} is not among the metrics "
                             f"({', '.join(metrics)}); plotting {metrics[0]!r}")
        if x is None and settings.get("x") in keys:
            x = settings["x"]
    metric = metric or (metrics[0] if metrics else None)
    md = [f"# Report: {runs_dir}", "", f"{len(done)} completed runs, {len(rows)} settings; "
          "metrics are mean ± std over seeds (sample std; \"seed-free\" where every seed gives the same value, "
          "as a frozen method does: its test-sampling interval is in the CI table); rows group runs whose "
          "resolved configs differ only in the seed; `select` is the reporting protocol (last epoch, best val "
          "epoch, or best test epoch).", ""]
    md.append(markdown_table(keys, metrics, rows) if rows else "_no completed runs_")
    dups = [r for r in rows if r.get("duplicate_seeds")]
    if dups:
        md += ["", "## Duplicate seeds", "",
               "These rows hold more than one run with the same seed (the same config run twice, e.g. in two "
               "run directories); their mean ± std counts each run:", ""]
        for r in dups:
            md.append(f"- {series_label(r, keys)}: seed(s) {', '.join(map(str, r['duplicate_seeds']))} in "
                      + ", ".join(f"`{d}`" for d in r["_dirs"]))
    if other:
        md += ["", f"## Not in the table ({len(other)} runs)", ""]
        md += [f"- `{o['dir']}`: {o['state']}" + (f" — {o['error']}" if o.get("error") else "") for o in other]
    png = runs_dir / "report.png"
    has_plot = bool(metric) and plot(png, keys, metric, rows, x)
    if not has_plot and png.exists():
        png.unlink()
        notes.append("no plot: no completed run has a metric to plot; removed the old report.png")
    if notes:
        md += ["", *[f"_Note: {n}_" for n in notes]]
    text = "\n".join(md) + "\n"
    atomic_write_text(runs_dir / "report.md", text)
    atomic_write_text(runs_dir / "report.csv", csv_text(keys, metrics, rows))
    return {"markdown": text, "rows": rows, "keys": keys, "metrics": metrics, "incomplete": other,
            "plot": str(png) if has_plot else None, "plot_note": "; ".join(notes)}
