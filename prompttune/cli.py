"""``prompttune`` command line: list | fit | test | sweep | report | zoo | demo | bench | transfer."""

from __future__ import annotations

import argparse
import json
import logging
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
    return 0


def _compose(args):
    from prompttune.config import compose

    return compose(args.experiment, args.overrides)


def _cmd_fit(args) -> int:
    from prompttune.runs import fit, run_dir

    cfg = _compose(args)
    result = fit(cfg, force=args.force)
    if result:
        print(json.dumps({"run_dir": str(run_dir(cfg)), "metrics": result.get("metrics"),
                          "trainable_params": result.get("trainable_params")}, indent=2))
    return 0


def _cmd_test(args) -> int:
    from prompttune.runs import evaluate

    cfg = _compose(args)
    print(json.dumps(evaluate(cfg, args.checkpoint), indent=2))
    return 0


def _cmd_sweep(args) -> int:
    from prompttune.sweep import run_sweep

    return run_sweep(args.sweep, dry_run=args.dry_run, wandb=args.wandb, extra=args.overrides,
                     report=not args.no_report)


def _cmd_report(args) -> int:
    from prompttune.report import make_report

    out = make_report(args.runs_dir, metric=args.metric, x=args.x)
    print(out["markdown"])
    return 0


def _cmd_zoo(args) -> int:
    from prompttune.backbones import zoo

    if args.zoo_cmd == "list":
        for row in zoo.describe():
            state = "built" if row["built"] else "not built"
            extra = f" ({row.get('build_time_s')} s)" if row["built"] else ""
            print(f"{row['name']:<22} {row['backbone']:<10} {state}{extra}  {row['description']}")
            if row["built"]:
                print(f"{'':<22} {row['path']}")
        return 0
    names = zoo.ZOO.names() if args.name == "all" else [args.name]
    for name in names:
        path = zoo.build(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def _cmd_demo(args) -> int:
    from prompttune.demo import run_demo

    return run_demo(sections=args.sections, runs_dir=args.runs_dir, seeds=args.seeds)


def _cmd_bench(args) -> int:
    from prompttune.bench import run_bench

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
    f.add_argument("--force", action="store_true", help="rerun even if the run directory holds a completed run")

    t = sub.add_parser("test", help="evaluate a run's checkpoint (or the untrained method) on the test split")
    t.add_argument("experiment")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--checkpoint", default=None, help="a checkpoint (default: <run_dir>/checkpoints/last.ckpt)")

    s = sub.add_parser("sweep", help="a grid over keys x seeds; rerunning skips completed runs")
    s.add_argument("sweep", help="sweep YAML (an experiment file with a `sweep:` block)")
    s.add_argument("overrides", nargs="*", help="key=value applied to every run")
    s.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    s.add_argument("--wandb", action="store_true", help="also write a W&B sweep config (wandb_sweep.yaml)")
    s.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    r = sub.add_parser("report", help="report.md, report.csv and a plot from the runs under RUNS_DIR")
    r.add_argument("runs_dir")
    r.add_argument("--metric", default=None, help="metric for the plot (default: the first test metric)")
    r.add_argument("--x", default=None, help="grid key for the plot's x axis (e.g. data.shots)")

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

    b = sub.add_parser("bench", help="framework overhead and throughput of a method's training step")
    b.add_argument("method")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--json", default=None, help="write the rows to this JSON file")
    b.add_argument("--steps", type=int, default=20)

    tr = sub.add_parser("transfer", help="TVP: a source x target transfer matrix of visual prompts")
    tr.add_argument("spec", help="transfer spec YAML (e.g. experiments/tvp_transfer.yaml; docs/tvp.md)")
    tr.add_argument("--out-dir", default=None, help="default: the spec's own out_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from prompttune.runs import quiet_lightning

    if not args.verbose:
        quiet_lightning()
    from prompttune.config import ConfigError
    from prompttune.data.base import DataError
    from prompttune.registry import RegistryError

    handlers = {"list": _cmd_list, "fit": _cmd_fit, "test": _cmd_test, "sweep": _cmd_sweep, "report": _cmd_report,
                "zoo": _cmd_zoo, "demo": _cmd_demo, "bench": _cmd_bench, "transfer": _cmd_transfer}
    try:
        return handlers[args.cmd](args)
    except (ConfigError, DataError, RegistryError, FileNotFoundError) as err:
        print(f"prompttune {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"prompttune {args.cmd}: stopped: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
