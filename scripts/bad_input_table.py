"""Run each bad input of the README's "Bad input" table through the real CLI and print the table.

    .venv/bin/python scripts/bad_input_table.py [--out docs/bad_input.md]

Every row is measured: the command's exit code and the first line it printed on stderr
(paths shortened to their temp-folder-relative names). Runs in a scratch folder with its own
cache (PROMPTTUNE_HOME), one thread per process; about 3-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = "experiments/smoke.yaml"


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **(env or {}))
    return subprocess.run([sys.executable, "-m", "prompttune", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=e)


def first_message(err: str, tmp: Path) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "error:" in ln or "interrupted" in ln), None)
    if pick is None:  # a warning (the run went on): the line that says what was done about it
        pick = next((ln for ln in lines if "warn" in ln.lower() or "data.shots" in ln), lines[-1] if lines else "")
    pick = pick.replace(str(tmp) + "/", "").replace(str(tmp), "<tmp>")
    pick = re.sub(r"\s+", " ", pick)
    return pick if len(pick) <= 260 else pick[:257] + "..."


def world(tmp: Path) -> Path:
    from prompttune.data.image_folder import ensure_synthetic

    root = tmp / "world"
    if not root.exists():
        ensure_synthetic({"kind": "classification", "n_train": 2, "n_val": 0, "n_test": 1, "side": 16, "seed": 0}, root)
    return root


def data_args(root: Path) -> list[str]:
    return [f"data.root={root}", "data.synthetic=null"]


def cases(tmp: Path):
    """(what the user did, callable returning the CompletedProcess)."""
    latin = tmp / "latin1.yaml"
    latin.write_bytes("method: coop\n# caf\xe9\n".encode("latin-1"))
    dup = tmp / "dup.yaml"
    dup.write_text("method: coop\nseed: 1\nmethod: zero_shot\n")
    broken = tmp / "broken.yaml"
    broken.write_text("method: coop\ndata: {shots: 4\n")
    archive = tmp / "pets.tar"
    archive.write_bytes(b"not a folder")
    (tmp / "empty").mkdir(exist_ok=True)
    a_file = tmp / "notes.txt"
    a_file.write_text("x")
    empty_seeds = tmp / "sweep_noseeds.yaml"
    empty_seeds.write_text("method: coop\nsweep:\n  grid: {data.shots: [1]}\n  seeds: []\n")
    ok_sweep = tmp / "sweep_ok.yaml"
    ok_sweep.write_text("method: coop\nsweep:\n  grid: {data.shots: [1]}\n  seeds: [0]\n")
    bad_grid = tmp / "sweep_badkey.yaml"
    bad_grid.write_text("method: coop\nsweep:\n  grid: {method.n_ctxx: [4, 8]}\n  seeds: [0]\n")
    rd = lambda name: f"run_dir={tmp / name}"  # noqa: E731

    def one_class():
        root = world(tmp)
        one = tmp / "one_class"
        if not one.exists():
            import shutil

            shutil.copytree(root, one)
            split_file = one / "split_prompttune_world.json"
            split = json.loads(split_file.read_text())
            split_file.write_text(json.dumps({s: [r for r in rows if r[1] == 0] for s, rows in split.items()}))
        return cli("fit", SMOKE, "method=coop", *data_args(one), rd("r_one"))

    def wrong_shape():
        first = cli("fit", SMOKE, "method=coop", "method.n_ctx=4", rd("r_ctx4"))
        if first.returncode != 0:
            return first
        return cli("test", SMOKE, "method=coop", "method.n_ctx=8", rd("r_ctx8"),
                   "--checkpoint", str(tmp / "r_ctx4" / "checkpoints" / "last.ckpt"))

    def pickled_checkpoint():
        import pickle

        f = tmp / "evil.ckpt"
        f.write_bytes(pickle.dumps({"state_dict": {}, "x": object()}))
        return cli("test", SMOKE, "method=coop", rd("r_evil"), "--checkpoint", str(f))

    def one_run():
        if (tmp / "runs_r" / "zs" / "result.json").is_file():
            return None
        ok = cli("fit", SMOKE, "method=zero_shot", f"run_dir={tmp / 'runs_r' / 'zs'}")
        return ok if ok.returncode != 0 else None

    def report_typo():
        return one_run() or cli("report", tmp / "runs_r", "--metric", "test/accc")

    def compare_missing():
        return one_run() or cli("compare", tmp / "runs_r", "method=coop", "method=zero_shot")

    return [
        ("config file not UTF-8 (latin-1 `é`)", lambda: cli("fit", latin, rd("r"))),
        ("a key given twice in one YAML mapping", lambda: cli("fit", dup, rd("r"))),
        ("malformed YAML", lambda: cli("fit", broken, rd("r"))),
        ("experiment path is a folder", lambda: cli("fit", tmp, rd("r"))),
        ("unknown key `method.n_ctxx=4`", lambda: cli("fit", SMOKE, "method=coop", "method.n_ctxx=4", rd("r"))),
        ("wrong type `method.n_ctx=lots`", lambda: cli("fit", SMOKE, "method=coop", "method.n_ctx=lots", rd("r"))),
        ("unknown method `method=copo`", lambda: cli("fit", SMOKE, "method=copo", rd("r"))),
        ("optimizer typo `method.optim.name=sgdd`", lambda: cli("fit", SMOKE, "method=coop", "method.optim.name=sgdd", rd("r"))),
        ("scheduler typo `method.optim.scheduler=cosin`",
         lambda: cli("fit", SMOKE, "method=coop", "method.optim.scheduler=cosin", rd("r"))),
        ("precision typo `trainer.precision=bf17`", lambda: cli("fit", SMOKE, "method=coop", "trainer.precision=bf17", rd("r"))),
        ("`method.class_token_position=midle`",
         lambda: cli("fit", SMOKE, "method=coop", "method.class_token_position=midle", rd("r"))),
        ("`ctx_init` with an `n_ctx` it silently overrides",
         lambda: cli("fit", SMOKE, "method=coop", "method.ctx_init=a photo of a", "method.n_ctx=16", rd("r"))),
        ("`data.shots=-1`", lambda: cli("fit", SMOKE, "method=coop", "data.shots=-1", rd("r"))),
        ("`data.batch_size=0`", lambda: cli("fit", SMOKE, "method=coop", "data.batch_size=0", rd("r"))),
        ("`method.optim.lr=-0.01`", lambda: cli("fit", SMOKE, "method=coop", "method.optim.lr=-0.01", rd("r"))),
        ("`method.optim.epochs=-3`", lambda: cli("fit", SMOKE, "method=coop", "method.optim.epochs=-3", rd("r"))),
        ("`method.optim.epochs=0` for a method that trains",
         lambda: cli("fit", SMOKE, "method=coop", "method.optim.epochs=0", rd("r"))),
        ("`seed=-1`", lambda: cli("fit", SMOKE, "method=coop", "seed=-1", rd("r"))),
        ("`wandb.mode=onlin`", lambda: cli("fit", SMOKE, "method=coop", "wandb.mode=onlin", rd("r"))),
        ("`data.root` is a file (an archive, not its folder)", lambda: cli("fit", SMOKE, "method=coop", *data_args(archive), rd("r"))),
        ("`data.root` is an empty folder", lambda: cli("fit", SMOKE, "method=coop", *data_args(tmp / "empty"), rd("r"))),
        ("a dataset with one class", one_class),
        ("`data.shots=100` with 2 images per class",
         lambda: cli("fit", SMOKE, "method=linear_probe", *data_args(world(tmp)), "data.shots=100", rd("r_shots"))),
        ("`run_dir` below a file", lambda: cli("fit", SMOKE, "method=coop", f"run_dir={a_file}/run")),
        ("`run_dir` under /proc", lambda: cli("fit", SMOKE, "method=coop", "run_dir=/proc/prompttune-run")),
        ("a checkpoint of another shape (n_ctx 4 into n_ctx 8)", wrong_shape),
        ("a pickled (not weights-only) checkpoint", pickled_checkpoint),
        ("sweep with `seeds: []`", lambda: cli("sweep", empty_seeds, "--dry-run")),
        ("sweep grid over an unknown key", lambda: cli("sweep", bad_grid, "--dry-run")),
        ("`sweep --seeds 0`", lambda: cli("sweep", ok_sweep, "--seeds", "0", "--dry-run")),
        ("`report --metric test/accc` (typo)", report_typo),
        ("`report` on a folder with no runs", lambda: cli("report", tmp / "empty")),
        ("`compare` naming a setting with no runs", compare_missing),
        ("`compare` with a malformed filter", lambda: cli("compare", tmp / "empty", "method", "method=coop")),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("-k", default=None, help="only the cases whose label contains this text")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prompttune-bad-input-"))
    os.environ["PROMPTTUNE_HOME"] = str(tmp / "home")
    rows = ["| bad input | exit code | what prompttune says |", "|---|---|---|"]
    for label, run in cases(tmp):
        if args.k and args.k not in label:
            continue
        out = run()
        msg = first_message(out.stderr, tmp).replace("|", "\\|")
        rows.append(f"| {label} | {out.returncode} | `{msg}` |")
        print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
