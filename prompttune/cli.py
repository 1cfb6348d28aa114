"""``prompttune`` command line: list | fit | test | sweep | report | compare | zoo | demo | bench | transfer."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from prompttune import _tvshim

_tvshim.install()


def _cmd_list(args) -> int:
    from prompttune import registry
    from prompttune.config import GROUPS, group_choices

    registry.load_all()
    for title, reg in (("methods", registry.METHODS), ("backbones", registry.BACKBONES),
                       ("datasets", registry.DATASETS), ("tasks", registry.TASKS), ("zoo", registry.ZOO),
                       ("synthetic writers", registry.SYNTHETIC)):
        print(f"{title}: {', '.join(reg.names())}")
    for g in GROUPS:
        print(f"configs/{g}: {', '.join(group_choices(g))}")
    cards = protocol_cards()
    if cards:
        print(f"\nprotocol cards (experiments/paper/; prompttune fit CARD): {len(cards)}")
        for c in cards:
            print(f"  {c['card']:<34} {c['metric']:<24} {c['expected']:<16} select={c['select']:<5} {c['paper']}")
    return 0


def protocol_cards() -> list[dict[str, str]]:
    """Each card's expected headline and reporting protocol, read from its ``protocol:`` block."""
    from prompttune.config import ConfigError, load_yaml, repo_root

    rows = []
    for path in sorted((repo_root() / "experiments" / "paper").glob("*.yaml")):
        try:
            card = load_yaml(path)
        except ConfigError as err:
            rows.append({"card": path.stem, "metric": "?", "expected": "?", "select": "?", "paper": f"unreadable: {err}"})
            continue
        proto = card.get("protocol") or {}
        head = proto.get("headline") or {}
        value, tol = head.get("value"), head.get("tolerance")
        expected = "not published" if value is None else f"{value}" + (f" ± {tol}" if tol is not None else "")
        rows.append({"card": path.stem, "metric": str(head.get("metric", "?")), "expected": expected,
                     "select": str(card.get("select", "last")), "paper": str(proto.get("paper", "?")).split(",")[0]})
    return rows


def _compose(args):
    from prompttune.config import compose

    return compose(args.experiment, args.overrides)


def _interrupted(err: KeyboardInterrupt) -> int:
    """SIGINT/SIGTERM: say how to go on and exit 128 + signal (130, 143), the shell convention."""
    import signal

    signum = getattr(err, "signum", signal.SIGINT)
    ckpt = getattr(err, "checkpoint", None)
    where = ""
    if ckpt is not None and Path(ckpt).is_file():
        try:
            from prompttune.utils import torch_load_trusted

            where = f"; {ckpt} holds {int(torch_load_trusted(ckpt).get('epoch', -1)) + 1} finished epoch(s)"
        except Exception:  # the message must not fail
            where = f"; checkpoint: {ckpt}"
    elif ckpt is not None:
        where = "; no epoch had finished, so nothing was saved"
    print(f"prompttune: interrupted; run the same command again to resume ({signal.Signals(signum).name}{where})",
          file=sys.stderr)
    return 128 + int(signum)


def _cmd_fit(args) -> int:
    from prompttune.runs import fit, run_dir

    try:
        cfg = _compose(args)
        result = fit(cfg, force=args.force)
    except KeyboardInterrupt as err:
        return _interrupted(err)
    if result:
        print(json.dumps({"run_dir": str(run_dir(cfg)), "metrics": result.get("metrics"),
                          "select": result.get("select"), "best_epoch": result.get("best_epoch"),
                          "trainable_params": result.get("trainable_params")}, indent=2))
    return 0


def _cmd_test(args) -> int:
    from prompttune.runs import evaluate

    try:
        cfg = _compose(args)
        metrics = evaluate(cfg, args.checkpoint)
    except KeyboardInterrupt as err:
        return _interrupted(err)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_sweep(args) -> int:
    from prompttune.config import ConfigError
    from prompttune.launchers import submit_slurm
    from prompttune.sweep import SweepInterrupted, run_point, run_sweep

    try:
        if args.point:
            return run_point(args.sweep, args.overrides, runs_dir=args.runs_dir, retry_failed=args.retry_failed,
                             wandb=args.wandb, seeds=args.seeds)
        if args.launcher == "slurm":
            opts = {k: getattr(args, k) for k in ("partition", "gpus_per_task", "cpus_per_task", "mem_gb", "time",
                                                   "array_parallelism", "slurm_dir", "account", "setup")}
            submit_slurm(args.sweep, args.overrides, opts, runs_dir=args.runs_dir, retry_failed=args.retry_failed,
                         wandb=args.wandb, cluster=args.slurm_cluster, dry_run=args.dry_run, seeds=args.seeds)
            return 0
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        return run_sweep(args.sweep, dry_run=args.dry_run, wandb=args.wandb, extra=args.overrides,
                         report=not args.no_report, runs_dir=args.runs_dir, jobs=args.jobs,
                         retry_failed=args.retry_failed, seeds=args.seeds)
    except SweepInterrupted as stop:
        print(f"prompttune sweep: {stop}; interrupted; run the same command again to resume", file=sys.stderr,
              flush=True)
        return stop.exit_code


def _cmd_report(args) -> int:
    from prompttune.report import make_report

    out = make_report(args.runs_dir, metric=args.metric, x=args.x)
    print(out["markdown"])
    if out.get("plot_note"):
        print(out["plot_note"], file=sys.stderr)
    return 0


def _cmd_compare(args) -> int:
    from prompttune.compare import compare, markdown

    print(markdown(compare(args.runs_dir, args.a, args.b, metric=args.metric, b_runs_dir=args.b_runs_dir)))
    return 0


def _cmd_zoo(args) -> int:
    from prompttune import zoo

    if args.zoo_cmd == "list":
        for row in zoo.describe():
            state = "built" if row["built"] else ("unusable, rebuilt on use" if row["problem"] else "not built")
            extra = f" ({row.get('build_time_s')} s)" if row["built"] else ""
            print(f"{row['name']:<22} {row['backbone']:<10} {state}{extra}  {row['description']}")
            if row["problem"]:
                print(f"{'':<22} {row['problem']}")
            if row["built"]:
                print(f"{'':<22} {row['path']}")
            bars = row.get("bars") or {spec: None for spec in row["bar_specs"]}
            if bars:
                shown = ", ".join(f"{spec}: {row.get(spec.split()[0], '?') if ok is not None else 'not built'}"
                                  for spec, ok in bars.items())
                print(f"{'':<22} bars: {shown}")
        return 0
    names = zoo.ZOO.names() if args.name == "all" else [args.name]
    for name in names:
        path = zoo.build(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def _cmd_demo(args) -> int:
    from prompttune.demo import run_demo

    return run_demo(sections=args.sections, runs_dir=args.runs_dir, seeds=args.seeds, jobs=args.jobs)


def _cmd_bench(args) -> int:
    from prompttune.bench import run_bench

    if args.sweep is not None:  # scaling curves (docs/bench.md); the positional is a curve name too
        from prompttune.bench import run_curves

        return run_curves([*([args.method] if args.method else []), *args.sweep, *args.overrides], args.out)
    if not args.method:
        from prompttune.config import ConfigError

        raise ConfigError("prompttune bench needs a METHOD (or `all`), or --sweep CURVE ...")
    return run_bench(args.method, overrides=args.overrides, json_path=args.json, steps=args.steps)


def _cmd_transfer(args) -> int:
    from prompttune.transfer import run_transfer

    res = run_transfer(args.spec, args.out_dir)
    print((Path(res["out_dir"]) / "transfer_matrix.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompttune", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="show Lightning's own logs")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("list", help="registered methods, backbones, datasets, tasks, zoo entries, config choices")

    f = sub.add_parser("fit", help="train and evaluate one run")
    f.add_argument("experiment", help="experiment YAML (e.g. experiments/smoke.yaml)")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=coop data.shots=4")
    f.add_argument("--force", action="store_true",
                   help="start over: discard whatever the run directory holds (record, checkpoints, metrics.csv)")

    t = sub.add_parser("test", help="evaluate a run's checkpoint (or the untrained method) on the test split")
    t.add_argument("experiment")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--checkpoint", default=None, help="a checkpoint (default: the run's best.ckpt if it selected an epoch, else last.ckpt)")

    s = sub.add_parser("sweep", help="a grid over keys x seeds; rerunning skips completed runs")
    s.add_argument("sweep", help="sweep YAML (an experiment file with a `sweep:` block)")
    s.add_argument("overrides", nargs="*", help="key=value applied to every run")
    s.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    s.add_argument("--wandb", action="store_true",
                   help="log every run to W&B and write W&B sweep configs for `wandb agent` (docs/scaling.md)")
    s.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    s.add_argument("--runs-dir", default=None, help="override the sweep's runs_dir")
    s.add_argument("--seeds", type=int, default=None,
                   help="seeds 0..N-1 instead of the file's sweep.seeds (the runs of seeds it already has are reused)")
    s.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each its own process: its own GPU(s), or cores/N CPU threads")
    s.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    s.add_argument("--point", action="store_true",
                   help="run only the grid point named by the key=value arguments (what --jobs and W&B agents run)")
    s.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="slurm: submit a SLURM job array through submitit; its tasks claim runs until none is left")
    sl = s.add_argument_group("SLURM (--launcher slurm)")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--account", default=None)
    sl.add_argument("--gpus-per-task", type=int, default=None)
    sl.add_argument("--cpus-per-task", type=int, default=None)
    sl.add_argument("--mem-gb", type=float, default=None)
    sl.add_argument("--time", type=int, default=60, help="minutes per task (preempted/timed-out tasks requeue)")
    sl.add_argument("--array-parallelism", type=int, default=None,
                    help="tasks in the array (default: one per run still to do)")
    sl.add_argument("--slurm-dir", default=None, help="submitit's folder (default: RUNS_DIR/slurm)")
    sl.add_argument("--setup", action="append", default=None,
                    help="a shell line run before each task (e.g. 'source .venv/bin/activate'); repeatable")
    sl.add_argument("--slurm-cluster", default="slurm", help=argparse.SUPPRESS)  # tests: 'local'

    r = sub.add_parser("report", help="report.md, report.csv and a plot from the runs under RUNS_DIR")
    r.add_argument("runs_dir")
    r.add_argument("--metric", default=None, help="metric for the plot (default: the first test metric)")
    r.add_argument("--x", default=None, help="grid key for the plot's x axis (e.g. data.shots)")

    c = sub.add_parser("compare", help="the paired difference A - B of two settings of finished runs, with its "
                                       "95 % CI over seeds and test items")
    c.add_argument("runs_dir")
    c.add_argument("a", help="setting A as key=value[,key=value...] (a key may be the last part of a dotted tag)")
    c.add_argument("b", help="setting B, the same way")
    c.add_argument("--metric", default=None, help="test metric (default: A's first test/ metric)")
    c.add_argument("--b-runs-dir", default=None, help="B's runs folder, when not RUNS_DIR")

    z = sub.add_parser("zoo", help="the offline zoo of small pretrained backbones")
    zs = z.add_subparsers(dest="zoo_cmd", required=True)
    zs.add_parser("list", help="zoo entries and whether they are built")
    zb = zs.add_parser("build", help="build (pretrain) a zoo entry into the cache")
    zb.add_argument("name", help="entry name, or 'all'")
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")

    d = sub.add_parser("demo", help="the embedded default comparison, offline")
    d.add_argument("--sections", nargs="*", default=None, help="demo sections to run (default: all)")
    d.add_argument("--runs-dir", default="runs/demo")
    d.add_argument("--seeds", type=int, default=None, help="number of seeds (default: each section's own)")
    d.add_argument("--jobs", type=int, default=None,
                   help="zoo builds and sections run at once, one thread each (default: the usable CPU cores)")

    from prompttune.bench import CURVES  # light: the curves import torch only when run

    b = sub.add_parser("bench", help="framework overhead and throughput of a method's training step")
    b.add_argument("method", nargs="?")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--json", default=None, help="write the rows to this JSON file")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--sweep", nargs="*", default=None, metavar="CURVE",
                   help="scaling curves instead (docs/bench.md): " + " ".join(CURVES))
    b.add_argument("--out", default="runs/bench_curves", help="--sweep: folder for each curve's JSON and PNG")

    tr = sub.add_parser("transfer", help="TVP: a source x target transfer matrix of visual prompts")
    tr.add_argument("spec", help="transfer spec YAML (e.g. experiments/tvp_transfer.yaml; docs/tvp.md)")
    tr.add_argument("--out-dir", default=None, help="default: the spec's own out_dir")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus ``key=value`` overrides after an option (``sweep X.yaml --jobs 2 seed=1``):
    argparse ends a ``nargs='*'`` positional at the first option and would refuse the rest."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        if len(overrides) < len(rest) or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*(args.overrides or []), *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a log file, not a terminal (the demo's children write to logs; tqdm reads this at import, so
    # it is set before anything imports tqdm): a progress bar's line every 30 s, not every step
    if not sys.stderr.isatty() or args.cmd == "demo":
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from prompttune.runs import quiet_lightning

    if not args.verbose:
        quiet_lightning()
    from prompttune.config import ConfigError
    from prompttune.data.base import DataError
    from prompttune.registry import RegistryError
    from prompttune.zoo import ZooBuildError

    handlers = {"list": _cmd_list, "fit": _cmd_fit, "test": _cmd_test, "sweep": _cmd_sweep, "report": _cmd_report,
                "compare": _cmd_compare, "zoo": _cmd_zoo, "demo": _cmd_demo, "bench": _cmd_bench,
                "transfer": _cmd_transfer}
    try:
        return handlers[args.cmd](args)
    except (ConfigError, DataError, RegistryError, FileNotFoundError) as err:
        print(f"prompttune {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"prompttune {args.cmd}: stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handler (composing, building, reporting)
        print(f"prompttune {args.cmd}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except ZooBuildError as err:  # a zoo model missed its competence bar: no verdict would mean anything
        print(f"prompttune {args.cmd}: zoo build failed: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
