import json
import math
from pathlib import Path

import pytest

from prompttune.config import ConfigError
from prompttune.report import collect, make_report, mean_std
from prompttune.sweep import expand, load_sweep, plan, run_sweep


def _sweep(tmp_path, grid="{method: [zero_shot, linear_probe]}", seeds="[0, 1]", extra=""):
    f = tmp_path / "sw.yaml"
    f.write_text(f"""sweep:
  name: t
  runs_dir: {tmp_path / 'runs'}
  grid: {grid}
  seeds: {seeds}
  report: {{metric: test/acc}}
backbone: {{weights: random}}
data: {{batch_size: 8}}
method: {{optim: {{epochs: 1}}}}
trainer: {{limit_train_batches: 2, limit_test_batches: 1}}
{extra}""")
    return f


def test_expand_union_of_grids_without_duplicates(tmp_path):
    block, _ = load_sweep(_sweep(tmp_path, grid="[{method: [coop], data.shots: [1, 2]}, {method: [coop], data.shots: [2]}]",
                                 seeds="[0]"))
    pts = expand(block)
    assert pts == [{"method": "coop", "data.shots": 1, "seed": 0}, {"method": "coop", "data.shots": 2, "seed": 0}]


def test_plan_validates_every_point_first(tmp_path):
    f = _sweep(tmp_path, grid="{method: [zero_shot, coop], method.n_ctx: [2]}")
    with pytest.raises(ConfigError, match=r"run method=zero_shot,n_ctx=2,s0: unknown key 'method.n_ctx'"):
        plan(f)
    assert not (tmp_path / "runs").exists()


def test_sweep_runs_skips_completed_and_reports(tmp_path, capsys):
    f = _sweep(tmp_path)
    assert run_sweep(f, dry_run=True) == 0
    assert "4 runs: 4 pending" in capsys.readouterr().out
    assert run_sweep(f, wandb=True) == 0
    runs = tmp_path / "runs"
    recs = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/result.json")}
    assert set(recs) == {"method=zero_shot,s0", "method=zero_shot,s1", "method=linear_probe,s0", "method=linear_probe,s1"}
    stamps = {k: v["finished_at"] for k, v in recs.items()}
    assert run_sweep(f) == 0  # rerun: nothing redone
    assert {p.parent.name: json.loads(p.read_text())["finished_at"] for p in runs.glob("*/result.json")} == stamps
    assert "4 runs: 4 completed" in (capsys.readouterr(), run_sweep(f, dry_run=True), capsys.readouterr().out)[2]
    wb = (runs / "wandb_sweep.yaml").read_text()
    assert "prompttune" in wb and "args_no_hyphens" in wb and "linear_probe" in wb
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
    assert "| coop | 3 | 60.00 ± 10.00 |" in out["markdown"]
    assert "half`: incomplete" in out["markdown"] and "torn`: unreadable result.json" in out["markdown"]
    done, other = collect(tmp_path)
    assert len(done) == 4 and len(other) == 2
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert csv[0].startswith("method,seeds,test/acc_mean,test/acc_std")


def test_mean_std_edge_cases():
    assert mean_std([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
