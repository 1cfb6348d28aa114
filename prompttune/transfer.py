"""The TVP transfer matrix: prompts trained on each source model, evaluated zero-shot on every
target model, with and without the prompt (TVP, CVPR 2024, Tables 1-2 protocol, issue #7).

``run_transfer(spec_path, out_dir=None)`` reads a spec (``experiments/tvp_transfer.yaml``)::

    transfer:
      models: {label: backbone config name, ...}     # configs/backbone/<name>.yaml
      sources: [label, ...]                          # default: every model
      targets: [label, ...]                          # default: every model
      data: [synth_count, synth_fine]                # data configs; each is one task
      methods: {vp: {}, tvp: {fca: 0.005, ...}}      # method configs + overrides of their keys
      seeds: [0, 1, 2]
      epochs: 5, lr: 1.0, batch_size: 32             # the prompt's training budget
      weights: pretrained                            # or random (tests, smoke)
      out_dir: runs/tvp-transfer

For every data set, method, seed and source it composes the ordinary run config (so every
key is validated as for ``prompttune fit``), builds the data module and method through
:mod:`prompttune.runs`, trains the prompt on the frozen source with the method's own update
step (the one ``manual_step`` takes under ``prompttune fit``) over train pixels read once, saves it
in the official format, and scores it on every target through the zero-shot scorers of
:mod:`prompttune.backbones.scorers`. The unprompted accuracy of each target (on the original
image, and on the resized, zero-padded image without a perturbation) is measured once per data
set. Each finished unit is a JSON record under ``out_dir/records``: a rerun skips it (resumable).

Outputs in ``out_dir``: ``transfer_matrix.csv`` (one row per data, method, seed, source, target),
``transfer_matrix.md`` (source x target tables, mean +- std over seeds, and the verdict: does
TVP transfer better than VP, with numbers), ``transfer_matrix.png`` (heatmaps of the gain),
and ``prompts/<data>/<method>/<source>-s<seed>.pth``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from prompttune.config import ConfigError, compose, load_yaml
from prompttune.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("prompttune")

SPEC_KEYS = {"name", "models", "sources", "targets", "data", "methods", "seeds", "epochs", "lr", "batch_size",
             "weights", "out_dir", "max_test", "trainer"}


# ---------------------------------------------------------------------------- spec
def load_spec(spec_path: str | Path) -> dict[str, Any]:
    """Read and validate a transfer spec; every error names the key and what was expected."""
    from prompttune.config import group_choices

    raw = load_yaml(spec_path)
    if "transfer" not in raw or not isinstance(raw["transfer"], dict):
        raise ConfigError(f"{spec_path}: expected a 'transfer:' mapping (see experiments/tvp_transfer.yaml)")
    spec = dict(raw["transfer"])
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{spec_path}: unknown transfer key(s) {sorted(unknown)}; valid: {', '.join(sorted(SPEC_KEYS))}")
    models = spec.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{spec_path}: transfer.models must map labels to backbone config names")
    backbones = group_choices("backbone")
    for label, choice in models.items():
        if not isinstance(choice, str) or choice not in backbones:
            raise ConfigError(f"{spec_path}: transfer.models.{label} = {choice!r} is not a backbone config; "
                              f"valid: {', '.join(backbones)}")
    for key in ("sources", "targets"):
        spec[key] = list(spec.get(key) or models)
        bad = [m for m in spec[key] if m not in models]
        if bad:
            raise ConfigError(f"{spec_path}: transfer.{key} names {bad}, not in transfer.models ({', '.join(models)})")
    data = spec.get("data")
    if isinstance(data, str):
        data = [data]
    if not data:
        raise ConfigError(f"{spec_path}: transfer.data must list data configs, e.g. [synth_count]")
    for d in data:
        if d not in group_choices("data"):
            raise ConfigError(f"{spec_path}: transfer.data names {d!r}; valid: {', '.join(group_choices('data'))}")
    spec["data"] = list(data)
    methods = spec.get("methods") or {"vp": {}, "tvp": {}}
    if isinstance(methods, list):
        methods = {m: {} for m in methods}
    for m, over in methods.items():
        if m not in group_choices("method"):
            raise ConfigError(f"{spec_path}: transfer.methods names {m!r}; valid: {', '.join(group_choices('method'))}")
        if not isinstance(over, dict):
            raise ConfigError(f"{spec_path}: transfer.methods.{m} must be a mapping of method keys")
    spec["methods"] = methods
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{spec_path}: transfer.seeds must be a list of non-negative integers, got {seeds!r}")
    spec.setdefault("epochs", 5)
    spec.setdefault("lr", 1.0)
    spec.setdefault("batch_size", 32)
    spec.setdefault("weights", "pretrained")
    if spec["weights"] not in ("pretrained", "random"):
        raise ConfigError(f"{spec_path}: transfer.weights must be 'pretrained' or 'random', got {spec['weights']!r}")
    spec.setdefault("name", Path(spec_path).stem)
    spec.setdefault("out_dir", f"runs/{spec['name']}")
    spec.setdefault("max_test", None)
    spec.setdefault("trainer", {})
    return spec


def run_config(spec: dict, data: str, method: str, source: str, seed: int):
    """The ordinary, validated run config of one prompt's training."""
    over = dict(spec["methods"][method])
    optim = dict(over.pop("optim", {}) or {})
    optim.setdefault("epochs", int(spec["epochs"]))
    optim.setdefault("lr", float(spec["lr"]))
    exp = {
        "defaults": {"method": method, "backbone": spec["models"][source], "data": data, "task": "classification"},
        "method": {**over, "optim": optim},
        "backbone": {"weights": spec["weights"]},
        "data": {"batch_size": int(spec["batch_size"])},
        "trainer": dict(spec.get("trainer") or {}),
        "seed": int(seed),
    }
    return compose(exp)


# ---------------------------------------------------------------------------- evaluation data
def _test_pixels(dm, max_test: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as raw [0, 1] pixels (the data module's normalisation undone) and labels."""
    dm.setup("test")
    loader = dm.test_dataloader()
    xs, ys = [], []
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    for batch in loader:
        xs.append(batch["image"] * std + mean)
        ys.append(batch["label"])
    x, y = torch.cat(xs), torch.cat(ys)
    if max_test:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(x), generator=g)[: int(max_test)].sort().values
        x, y = x[idx], y[idx]
    return x, y


# ---------------------------------------------------------------------------- main
def run_transfer(spec_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train vp/tvp prompts on each source and evaluate on each target; write the matrix.

    Returns ``{"rows": [...], "summary": {...}, "out_dir": str}``.
    """
    import lightning as L

    from prompttune import runs
    from prompttune.backbones.scorers import build_backbone, make_scorer
    from prompttune.methods.tvp import pad_image, save_prompt

    runs.quiet_lightning()
    spec = load_spec(spec_path)
    out = Path(out_dir or spec["out_dir"])
    if not out.is_absolute() and out_dir is None:
        out = Path.cwd() / out
    (out / "records").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "spec.json", json.dumps(spec, indent=2) + "\n")

    # every config is composed (and so validated) before any compute
    configs = {(d, m, s, seed): run_config(spec, d, m, s, seed)
               for d in spec["data"] for m in spec["methods"] for s in spec["sources"] for seed in spec["seeds"]}

    backbones: dict[str, Any] = {}

    def backbone(label: str):
        if label not in backbones:
            backbones[label] = build_backbone(spec["models"][label], spec["weights"])
        return backbones[label]

    scorers = {}

    def scorer(label: str):
        if label not in scorers:
            scorers[label] = make_scorer(backbone(label))
        return scorers[label]

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for d in spec["data"]:
        # unprompted accuracy of every target, once per data set
        first = configs[(d, next(iter(spec["methods"])), spec["sources"][0], spec["seeds"][0])]
        dm0 = runs.build_datamodule(first, backbone(spec["sources"][0]))
        test_x, test_y = _test_pixels(dm0, spec["max_test"])
        classnames = dm0.info()["classnames"]
        base_file = out / "records" / f"{d}__unprompted.json"
        base = json.loads(base_file.read_text()) if base_file.is_file() else {}
        for tgt in spec["targets"]:
            if tgt not in base:
                canvas = int(scorer(spec["sources"][0]).image_size)
                m0 = configs[(d, next(iter(spec["methods"])), spec["sources"][0], spec["seeds"][0])].method
                padded = pad_image(test_x, canvas, int(m0.image_size))
                base[tgt] = {"acc_clean": scorer(tgt).accuracy(test_x, test_y, classnames),
                             "acc_pad": scorer(tgt).accuracy(padded, test_y, classnames)}
                atomic_write_json(base_file, base)
        for m in spec["methods"]:
            for src in spec["sources"]:
                for seed in spec["seeds"]:
                    rec_file = out / "records" / f"{d}__{m}__{src}__s{seed}.json"
                    rec = json.loads(rec_file.read_text()) if rec_file.is_file() else None
                    if rec is None or any(t not in rec.get("acc", {}) for t in spec["targets"]):
                        # new, or made before a target was added to the spec: (re)train and score
                        rec = _train_and_evaluate(configs[(d, m, src, seed)], backbone(src), spec, test_x, test_y,
                                                  classnames, scorer, runs, L)
                        save_prompt(rec.pop("_perturbation"), out / "prompts" / d / m / f"{src}-s{seed}.pth")
                        atomic_write_json(rec_file, rec)
                    for tgt in spec["targets"]:
                        rows.append({"data": d, "method": m, "source": src, "target": tgt, "seed": seed,
                                     "acc_clean": base[tgt]["acc_clean"], "acc_pad": base[tgt]["acc_pad"],
                                     "acc_prompt": rec["acc"][tgt],
                                     "gain": rec["acc"][tgt] - base[tgt]["acc_clean"]})
                    log.info("%s %s %s s%d: %s (%.0fs)", d, m, src, seed,
                             {t: round(v, 3) for t, v in rec["acc"].items()}, time.perf_counter() - t0)
    summary = summarise(rows, spec)
    write_outputs(rows, summary, spec, out)
    return {"rows": rows, "summary": summary, "out_dir": str(out)}


def _train_pixels(dm) -> tuple[torch.Tensor, torch.Tensor]:
    """The (few-shot) train split as raw pixels, read once: every epoch reuses the tensor."""
    dm.setup("fit")
    ds = dm.datasets["train"]
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["image"] for it in items])
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    return x * std + mean, torch.stack([it["label"] for it in items])


def _train_and_evaluate(cfg, src_backbone, spec, test_x, test_y, classnames, scorer, runs, L) -> dict[str, Any]:
    """Train one prompt with the method's own update (``prompt_step``: the same step that
    ``manual_step`` takes under ``prompttune fit``) over cached train pixels, then score it
    on every target. A plain loop, not a Lightning Trainer: 36 short trainings per matrix."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = runs.build_datamodule(cfg, src_backbone)
    method = runs.build_method(cfg)
    method.setup(src_backbone, dm)
    train_x, train_y = _train_pixels(dm)
    epochs, lr, bs = int(cfg.method.optim.epochs), float(cfg.method.optim.lr), int(cfg.data.batch_size)
    limit = (spec.get("trainer") or {}).get("limit_train_batches")
    g = torch.Generator().manual_seed(int(cfg.seed))
    t0 = time.perf_counter()
    losses = []
    for epoch in range(epochs):
        step_lr = method.cosine_lr(lr, epoch, epochs)
        perm = torch.randperm(len(train_x), generator=g)
        for k, i in enumerate(range(0, len(perm), bs)):
            if limit is not None and k >= int(limit):
                break
            idx = perm[i:i + bs]
            loss, _ = method.prompt_step(train_x[idx], train_y[idx], step_lr)
            losses.append(float(loss))
    train_s = time.perf_counter() - t0
    delta = method.perturbation.detach().cpu()
    prompted = method.clean(test_x) + delta
    acc = {tgt: scorer(tgt).accuracy(prompted, test_y, classnames) for tgt in spec["targets"]}
    return {"data": cfg.choices.data, "method": cfg.choices.method, "source": cfg.choices.backbone,
            "seed": int(cfg.seed), "acc": acc, "train_time_s": round(train_s, 2),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "prompt_linf": float(delta.abs().max()), "_perturbation": delta}


# ---------------------------------------------------------------------------- summaries
def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarise(rows: list[dict], spec: dict) -> dict[str, Any]:
    """Per data and method: mean gain on the source itself (diagonal) and on the other models
    (off-diagonal, the transfer), each averaged per seed, then mean +- std over seeds."""
    out: dict[str, Any] = {}
    for d in spec["data"]:
        out[d] = {}
        for m in spec["methods"]:
            per_seed = {"self": [], "transfer": []}
            for seed in spec["seeds"]:
                sel = [r for r in rows if r["data"] == d and r["method"] == m and r["seed"] == seed]
                diag = [r["gain"] for r in sel if r["source"] == r["target"]]
                off = [r["gain"] for r in sel if r["source"] != r["target"]]
                if diag:
                    per_seed["self"].append(sum(diag) / len(diag))
                if off:
                    per_seed["transfer"].append(sum(off) / len(off))
            out[d][m] = {k: {"mean": _mean_std(v)[0], "std": _mean_std(v)[1], "per_seed": v}
                         for k, v in per_seed.items()}
        if "vp" in spec["methods"] and "tvp" in spec["methods"]:
            a, b = out[d]["tvp"]["transfer"]["per_seed"], out[d]["vp"]["transfer"]["per_seed"]
            diffs = [x - y for x, y in zip(a, b)]
            mean, sd = _mean_std(diffs)
            out[d]["tvp_minus_vp_transfer"] = {"mean": mean, "std": sd, "per_seed": diffs,
                                               "wins": sum(x > 0 for x in diffs), "n": len(diffs)}
    return out


def _pct(x: float) -> str:
    return "nan" if x != x else f"{100 * x:.1f}"


def _pm(m: float, s: float) -> str:
    return f"{100 * m:+.1f} ± {100 * s:.1f}"


def verdict(summary: dict, d: str) -> str:
    v = summary[d].get("tvp_minus_vp_transfer")
    if not v or v["n"] == 0:
        return f"{d}: no vp/tvp pair to compare."
    tv, vp = summary[d]["tvp"]["transfer"], summary[d]["vp"]["transfer"]
    # a difference inside the seed-to-seed spread (or below the 0.1-point display precision) is no difference
    clear = abs(v["mean"]) >= max(v["std"], 0.0005)
    word = "no differently" if not clear else "better" if v["mean"] > 0 else "worse"
    sure = ("in every seed" if v["wins"] == v["n"] else "in no seed" if v["wins"] == 0
            else f"in {v['wins']} of {v['n']} seeds")
    return (f"**{d}: TVP transfers {word} than VP**: mean off-diagonal gain over the unprompted targets "
            f"{_pm(tv['mean'], tv['std'])} points (TVP) vs {_pm(vp['mean'], vp['std'])} (VP); "
            f"TVP − VP = {_pm(v['mean'], v['std'])} points, TVP ahead {sure}.")


def write_outputs(rows: list[dict], summary: dict, spec: dict, out: Path) -> None:
    fields = ["data", "method", "source", "target", "seed", "acc_clean", "acc_pad", "acc_prompt", "gain"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in fields})
    atomic_write_text(out / "transfer_matrix.csv", buf.getvalue())

    md = [f"# Transfer matrix: {spec['name']}", "",
          f"Prompts trained on each source (rows), evaluated zero-shot on each target (columns). "
          f"Cells: accuracy with the prompt, % (mean ± std over seeds {spec['seeds']}), and in brackets the "
          "gain over the target's unprompted accuracy on the original image, in points. "
          f"{spec['epochs']} epochs, step {spec['lr']}, batch {spec['batch_size']}.", ""]
    for d in spec["data"]:
        md += [f"## {d}", "", verdict(summary, d), ""]
        for m in spec["methods"]:
            md += [f"### {m}", "", "| source \\ target | " + " | ".join(spec["targets"]) + " |",
                   "|---|" + "---|" * len(spec["targets"])]
            for src in spec["sources"]:
                cells = []
                for tgt in spec["targets"]:
                    sel = [r for r in rows if r["data"] == d and r["method"] == m and r["source"] == src
                           and r["target"] == tgt]
                    am, asd = _mean_std([r["acc_prompt"] for r in sel])
                    gm, _ = _mean_std([r["gain"] for r in sel])
                    cells.append(f"{_pct(am)} ± {_pct(asd)} ({100 * gm:+.1f})")
                md.append(f"| {src} | " + " | ".join(cells) + " |")
            md.append("")
        base = {r["target"]: r for r in rows if r["data"] == d}
        md += ["Unprompted: | " + " | ".join(spec["targets"]) + " |", "|---|" + "---|" * len(spec["targets"]),
               "| original image | " + " | ".join(_pct(base[t]["acc_clean"]) for t in spec["targets"]) + " |",
               "| resized + padded, no prompt | " + " | ".join(_pct(base[t]["acc_pad"]) for t in spec["targets"]) + " |",
               "", "| method | gain on the source (diagonal) | gain on other models (transfer) |", "|---|---|---|"]
        for m in spec["methods"]:
            s = summary[d][m]
            md.append(f"| {m} | {_pm(s['self']['mean'], s['self']['std'])} | "
                      f"{_pm(s['transfer']['mean'], s['transfer']['std'])} |")
        md.append("")
    atomic_write_text(out / "transfer_matrix.md", "\n".join(md) + "\n")
    atomic_write_json(out / "summary.json", summary)
    plot_heatmaps(rows, spec, out / "transfer_matrix.png")


def plot_heatmaps(rows: list[dict], spec: dict, path: Path) -> None:
    """One heatmap per (data, method) of the mean gain (points) of target accuracy from the prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods, data = list(spec["methods"]), spec["data"]
    src, tgt = spec["sources"], spec["targets"]
    fig, axes = plt.subplots(len(data), len(methods), squeeze=False,
                             figsize=(1.2 + 1.1 * len(tgt) * len(methods), 0.8 + 1.0 * len(src) * len(data)))
    grids = {}
    for d in data:
        for m in methods:
            g = np.zeros((len(src), len(tgt)))
            for i, s in enumerate(src):
                for j, t in enumerate(tgt):
                    v = [r["gain"] for r in rows if (r["data"], r["method"], r["source"], r["target"]) == (d, m, s, t)]
                    g[i, j] = 100 * (sum(v) / len(v)) if v else float("nan")
            grids[(d, m)] = g
    lim = max(1.0, max(float(np.nanmax(np.abs(g))) for g in grids.values()))
    for a, d in enumerate(data):
        for b, m in enumerate(methods):
            ax, g = axes[a][b], grids[(d, m)]
            im = ax.imshow(g, cmap="RdBu", vmin=-lim, vmax=lim)
            for i in range(len(src)):
                for j in range(len(tgt)):
                    ax.text(j, i, f"{g[i, j]:+.1f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(tgt)), tgt, rotation=30, ha="right", fontsize=7)
            ax.set_yticks(range(len(src)), src, fontsize=7)
            ax.set_title(f"{d}: {m}", fontsize=9)
            if b == 0:
                ax.set_ylabel("source")
            if a == len(data) - 1:
                ax.set_xlabel("target")
    fig.colorbar(im, ax=axes, shrink=0.7, label="accuracy gain from the prompt (points)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- mechanism probe
def gradient_shares(method: Any, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How much of TVP's update comes from FCA and TSE: the frame-masked gradient norm of each
    weighted term (``task``, ``fca * FCA``, ``-tse * TSE``) at the current prompt, and the cosine
    between the full update direction and the task-only one (1.0: TVP steps exactly as VP would)."""
    mask, delta = method.mask, method.perturbation

    def grad(term: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(term, delta, retain_graph=True)
        return (g * mask).flatten()

    raw = method.objective_terms(pixels, labels)  # the very terms TVP's step differentiates
    weight = {"task": 1.0, "fca": method.fca, "tse": -method.tse}  # as in Eq. 7
    terms = {k: weight[k] * v for k, v in raw.items()}
    grads = {k: grad(v) for k, v in terms.items()}
    total = sum(grads.values())
    out = {f"grad_norm/{k}": float(g.norm()) for k, g in grads.items()}
    out["cos(update, task-only update)"] = float(torch.nn.functional.cosine_similarity(total, grads["task"], dim=0))
    return out


def probe(backbone: str, data: str, tse_backbone: str = "zoo_clip_s2", seeds: tuple[int, ...] = (0, 1, 2),
          epochs: int = 5, lr: float = 1.0, fca: float = 0.005, tse: float = 0.001) -> list[dict[str, Any]]:
    """Train VP and TVP (same seed, same batches) on ``backbone``; per seed, report TVP's gradient
    shares at the start and the end, and the cosine between the two trained prompts."""
    import lightning as L

    from prompttune import runs
    from prompttune.backbones.scorers import build_backbone

    runs.quiet_lightning()
    src = build_backbone(backbone, "pretrained")
    rows = []
    for seed in seeds:
        prompts, shares = {}, {}
        for m in ("vp", "tvp"):
            over = {"optim": {"epochs": epochs, "lr": lr}}
            if m == "tvp":
                over.update(fca=fca, tse=tse, tse_backbone=tse_backbone)
            cfg = compose({"defaults": {"method": m, "backbone": backbone, "data": data, "task": "classification"},
                           "method": over, "seed": int(seed)})
            L.seed_everything(int(seed), workers=True, verbose=False)
            dm = runs.build_datamodule(cfg, src)
            method = runs.build_method(cfg)
            method.setup(src, dm)
            x, y = _train_pixels(dm)
            g = torch.Generator().manual_seed(int(seed))
            if m == "tvp":
                shares["start"] = gradient_shares(method, x[:64], y[:64])
            for epoch in range(epochs):
                step_lr = method.cosine_lr(lr, epoch, epochs)
                perm = torch.randperm(len(x), generator=g)
                for i in range(0, len(perm), int(cfg.data.batch_size)):
                    idx = perm[i:i + int(cfg.data.batch_size)]
                    method.prompt_step(x[idx], y[idx], step_lr)
            if m == "tvp":
                shares["end"] = gradient_shares(method, x[:64], y[:64])
            prompts[m] = method.perturbation.detach().flatten()
        cos = float(torch.nn.functional.cosine_similarity(prompts["vp"], prompts["tvp"], dim=0))
        rows.append({"seed": int(seed), "cos(vp prompt, tvp prompt)": round(cos, 4),
                     **{f"{when} {k}": round(v, 4) for when, d in shares.items() for k, v in d.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m prompttune.transfer", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="a transfer spec, or 'probe' for TVP's gradient-share probe (docs/tvp.md)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--backbone", default="zoo_clip", help="probe: the source backbone config")
    p.add_argument("--data", default="synth_fine", help="probe: the data config")
    p.add_argument("--tse-backbone", default="zoo_clip_s2", help="probe: the TSE CLIP's backbone config")
    p.add_argument("--fca", type=float, default=0.005, help="probe: FCA weight (official 0.005)")
    p.add_argument("--tse", type=float, default=0.001, help="probe: TSE weight (official 0.001)")
    p.add_argument("--epochs", type=int, default=5, help="probe: prompt training epochs")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.spec == "probe":
        for row in probe(a.backbone, a.data, a.tse_backbone, epochs=a.epochs, fca=a.fca, tse=a.tse):
            print(json.dumps(row))
        return 0
    res = run_transfer(a.spec, a.out_dir)
    print((Path(res["out_dir"]) / "transfer_matrix.md").read_text())
    return 0


if __name__ == "__main__":
    import prompttune._tvshim  # noqa: F401 - torchvision beside CPU torch

    raise SystemExit(main())
