import json
import math
from pathlib import Path

import pytest

from prompttune.config import ConfigError
from prompttune.report import collect, make_report, mean_std
from prompttune.sweep import expand, load_sweep, plan, run_sweep




def test_expand_union_of_grids_without_duplicates(tmp_path, tiny_sweep):
    block, _ = load_sweep(tiny_sweep("t", grid="[{method: [coop], data.shots: [1, 2]}, {method: [coop], data.shots: [2]}]",
                                 seeds="[0]"))
    pts = expand(block)
    assert pts == [{"method": "coop", "data.shots": 1, "seed": 0}, {"method": "coop", "data.shots": 2, "seed": 0}]


def test_plan_validates_every_point_first(tmp_path, tiny_sweep):
    f = tiny_sweep("t", grid="{method: [zero_shot, coop], method.n_ctx: [2]}")
    with pytest.raises(ConfigError, match=r"run method=zero_shot,n_ctx=2,s0: unknown key 'method.n_ctx'"):
        plan(f)
    assert not (tmp_path / "runs").exists()


def test_sweep_runs_skips_completed_and_reports(tmp_path, capsys, tiny_sweep):
    f = tiny_sweep("t")
    assert run_sweep(f, dry_run=True) == 0
    assert "4 runs: 4 pending" in capsys.readouterr().out
    assert run_sweep(f) == 0
    out = capsys.readouterr().out
    assert "[1/4] method=zero_shot,s0  completed" in out and "ETA" in out and "elapsed" in out
    runs = tmp_path / "runs"
    recs = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/result.json")}
    assert set(recs) == {"method=zero_shot,s0", "method=zero_shot,s1", "method=linear_probe,s0", "method=linear_probe,s1"}
    stamps = {k: v["finished_at"] for k, v in recs.items()}
    assert run_sweep(f) == 0  # rerun: nothing redone
    assert {p.parent.name: json.loads(p.read_text())["finished_at"] for p in runs.glob("*/result.json")} == stamps
    assert "[4/4] method=linear_probe,s1  skipped  completed" in capsys.readouterr().out
    assert run_sweep(f, dry_run=True) == 0
    assert "4 runs: 4 completed" in capsys.readouterr().out
    for name in ("report.md", "report.csv", "report.png"):
        assert (runs / name).is_file()


def _record(d: Path, method, seed, acc, status="completed"):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("x: 1\n")
    (d / "result.json").write_text(json.dumps({
        "status": status, "method": method, "backbone": "b", "data": "d", "seed": seed, "metrics": {"test/acc": acc},
        "trainable_params": 10, "total_params": 100, "train_time_s": 1.0, "samples_per_s": 5.0, "peak_mem_mb": 3.0,
        "tags": {"method": method}}))


def test_report_mean_std_by_hand(tmp_path):
    _record(tmp_path / "a0", "coop", 0, 0.50)
    _record(tmp_path / "a1", "coop", 1, 0.70)
    _record(tmp_path / "a2", "coop", 2, 0.60)
    _record(tmp_path / "b0", "zero_shot", 0, 0.30)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("x: 1\n")  # killed before its record
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "result.json").write_text('{"status": "compl')  # a torn write is never "completed"
    out = make_report(tmp_path)
    row = next(r for r in out["rows"] if r["method"] == "coop")
    assert row["seeds"] == 3
    m, s = row["test/acc"]
    assert abs(m - 0.6) < 1e-12 and abs(s - 0.1) < 1e-12  # sample std of .5 .6 .7
    assert "| coop | last | 3 | 60.00 ± 10.00 |" in out["markdown"]
    assert "half`: incomplete" in out["markdown"] and "torn`: unreadable result.json" in out["markdown"]
    done, other = collect(tmp_path)
    assert len(done) == 4 and len(other) == 2
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert csv[0].startswith("method,select,seeds,duplicate_seeds,test/acc_mean,test/acc_std")


def test_mean_std_edge_cases():
    assert mean_std([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


# --------------------------------------------------------------------------- report grouping
def _run_with_config(d: Path, seed, acc, shots=1, method="coop", select="last", tags=None):
    """A run directory as runs.fit leaves it: a resolved config.yaml and a result.json."""
    d.mkdir(parents=True)
    cfg = {"method": {"name": method, "n_ctx": 4, "optim": {"lr": 0.002}}, "backbone": {"name": "clip"},
           "data": {"name": "synth_fine", "shots": shots}, "task": {"name": "classification"},
           "trainer": {"accelerator": "cpu", "cpu_threads": 1}, "seed": seed, "run_dir": str(d), "run_name": d.name,
           "wandb": {"enabled": False}, "tags": tags or {},
           "choices": {"method": method, "backbone": "zoo_clip", "data": "synth_fine", "task": "classification",
                       "trainer": "cpu"}}
    import yaml

    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "result.json").write_text(json.dumps({
        "status": "completed", "method": method, "backbone": "zoo_clip", "data": "synth_fine", "seed": seed,
        "metrics": {"test/acc": acc}, "select": select, "trainable_params": 10, "total_params": 100,
        "train_time_s": 1.0, "samples_per_s": 5.0, "peak_mem_mb": 3.0, "tags": tags or {}}))


def test_report_groups_by_config_not_tags_and_flags_duplicate_seeds(tmp_path):
    # two plain fits with shots 1 and 4 and no tags: two rows, not one "seeds 2" row
    _run_with_config(tmp_path / "a", 0, 0.5, shots=1)
    _run_with_config(tmp_path / "b", 0, 0.8, shots=4)
    out = make_report(tmp_path)
    assert out["keys"] == ["method", "data.shots"]  # only what tells the rows apart (+ method)
    assert [(r["data.shots"], r["seeds"]) for r in out["rows"]] == [(1, 1), (4, 1)]
    assert "| coop | 1 | last | 1 | 50.00 ± 0.00 |" in out["markdown"]
    # same tags, different configs: still two rows; same config twice with seed 0: flagged
    _run_with_config(tmp_path / "c", 0, 0.7, shots=4, tags={"method": "coop"})
    _run_with_config(tmp_path / "d", 1, 0.9, shots=4, select="val")
    out = make_report(tmp_path)
    row = next(r for r in out["rows"] if r["data.shots"] == 4)
    assert row["seeds"] == 3 and row["duplicate_seeds"] == [0] and row["select"] == "last/val"
    assert "⚠ duplicate seed 0" in out["markdown"] and "## Duplicate seeds" in out["markdown"]
    assert "`" + str(tmp_path / "b") + "`" in out["markdown"]
    # run-identity keys (run_dir, wandb, tags, cpu_threads) do not split a setting
    assert len(out["rows"]) == 2


def test_report_metric_typo_lists_metrics_and_no_stale_plot(tmp_path, capsys):
    from prompttune.cli import main

    _run_with_config(tmp_path / "a", 0, 0.5)
    assert main(["report", str(tmp_path), "--metric", "test/accuracy"]) == 2
    err = capsys.readouterr().err
    assert "'test/accuracy' is not a metric" in err and "metrics there: test/acc" in err
    assert main(["report", str(tmp_path), "--x", "data.shot"]) == 2
    assert "keys that do: method" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "report.png").is_file()
    # the runs lose their metrics: the old plot must not stay beside the new table
    rec = json.loads((tmp_path / "a" / "result.json").read_text())
    rec["metrics"] = {}
    (tmp_path / "a" / "result.json").write_text(json.dumps(rec))
    out = make_report(tmp_path)
    assert not (tmp_path / "report.png").exists() and "removed the old report.png" in out["markdown"]


def test_a_frozen_row_reads_seed_free_not_plus_minus_zero(tmp_path):
    """Issue 16: "± 0.00" on a frozen method hid its test-sampling noise; a row whose seeds all
    give the same value says so, and a row whose seeds differ keeps its sample std."""
    _run_with_config(tmp_path / "a", 0, 0.5, shots=1)
    _run_with_config(tmp_path / "b", 1, 0.5, shots=1)
    _run_with_config(tmp_path / "c", 0, 0.5, shots=4)
    _run_with_config(tmp_path / "d", 1, 0.7, shots=4)
    md = make_report(tmp_path)["markdown"]
    assert "| coop | 1 | last | 2 | 50.00 (seed-free) |" in md
    assert "| coop | 4 | last | 2 | 60.00 ± 14.14 |" in md
    assert "± 0.00" not in md
