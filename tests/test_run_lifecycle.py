"""One run's life: identity by config, recovery from failed runs, filesystem and checkpoint errors,
model selection (select: last | val | test), and a metrics.csv history that survives a resume."""

import csv
import json
import os
import time
from pathlib import Path

import pytest
import torch

from prompttune.config import ConfigError, compose
from prompttune.runs import config_hash, evaluate, fit, identity, prepare_run_dir, run_dir, run_name

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments/smoke.yaml"
LP = ["method=linear_probe", "trainer.cpu_threads=1"]


def _rows(run: Path) -> list[dict]:
    with open(run / "logs" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- identity
def test_identity_ignores_placement_and_logging_but_not_settings(tmp_path):
    base = compose(SMOKE, LP)
    same = [f"run_dir={tmp_path}", "run_name=x", "runs_root=elsewhere", "wandb.enabled=true", "tags.k=1",
            "resume=false", "trainer.cpu_threads=2", "trainer.enable_progress_bar=true", "data.num_workers=2"]
    assert config_hash(compose(SMOKE, LP + same)) == config_hash(base)
    for change in ("data.shots=4", "seed=1", "method.optim.lr=0.5", "select=val"):
        assert config_hash(compose(SMOKE, LP + [change])) != config_hash(base), change
    # seeds of one setting share the seedless identity (what `report` groups by)
    assert config_hash(compose(SMOKE, LP + ["seed=1"]), drop_seed=True) == config_hash(base, drop_seed=True)
    assert "seed" not in identity(base, drop_seed=True) and "run_dir" not in identity(base)


def test_identity_is_the_same_on_machines_with_other_cache_folders(monkeypatch, tmp_path):
    cfg = compose(SMOKE, LP)
    data_root = str(cfg.data.root)
    assert "${cache:}" in json.dumps(identity(cfg)) or "${repo:}" in json.dumps(identity(cfg)), data_root
    h = config_hash(cfg)
    monkeypatch.setenv("PROMPTTUNE_HOME", str(tmp_path / "other-home"))
    assert config_hash(compose(SMOKE, LP)) == h


def test_default_run_dir_carries_the_config_hash_so_other_shots_never_reuse_a_result(tmp_path):
    a = compose(SMOKE, LP + [f"runs_root={tmp_path}", "data.shots=1"])
    b = compose(SMOKE, LP + [f"runs_root={tmp_path}", "data.shots=2"])
    assert run_name(a).startswith("linear_probe-synth_fine-zoo_clip-s0-") and run_name(a).endswith(config_hash(a))
    assert run_dir(a) != run_dir(b)
    ra, rb = fit(a), fit(b)
    assert ra["config_hash"] == config_hash(a) and rb["config_hash"] == config_hash(b)
    assert fit(a)["finished_at"] == ra["finished_at"]  # the same config is "already done"


def test_completed_run_with_another_config_in_the_same_run_dir_is_refused_then_forced(tmp_path):
    fit(compose(SMOKE, LP + [f"run_dir={tmp_path}", "data.shots=1"]))
    other = compose(SMOKE, LP + [f"run_dir={tmp_path}", "data.shots=2"])
    with pytest.raises(ConfigError, match=r"completed run with a different config \(data.shots: 1 -> 2\).*--force"):
        fit(other)
    res = fit(other, force=True)
    assert res["status"] == "completed" and json.loads((tmp_path / "result.json").read_text())["config_hash"] == \
        config_hash(other)


# --------------------------------------------------------------------------- recovery
def _fail_at_step(monkeypatch, n: int):
    from prompttune.tasks.classification import ClassificationTask

    calls = []
    real = ClassificationTask.loss

    def flaky(self, outputs, batch):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected failure")
        return real(self, outputs, batch)

    monkeypatch.setattr(ClassificationTask, "loss", flaky)


def test_failed_run_is_recorded_and_never_blocks_the_fixed_rerun(tmp_path, monkeypatch):
    _fail_at_step(monkeypatch, 1)
    bad = compose(SMOKE, LP + [f"run_dir={tmp_path}", "method.optim.lr=0.02"])
    with pytest.raises(RuntimeError, match="injected"):
        fit(bad)
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["status"] == "failed" and "RuntimeError: injected failure" in rec["error"]
    assert rec["config_hash"] == config_hash(bad) and (tmp_path / "config.yaml").is_file()
    monkeypatch.undo()
    fixed = compose(SMOKE, LP + [f"run_dir={tmp_path}", "method.optim.lr=0.01"])
    res = fit(fixed)  # a different config replaces the failed run: no hand deletion, no --force
    assert res["status"] == "completed" and res["config_hash"] == config_hash(fixed)


def test_failed_run_with_the_same_config_reruns(tmp_path, monkeypatch):
    _fail_at_step(monkeypatch, 1)
    cfg = compose(SMOKE, LP + [f"run_dir={tmp_path}"])
    with pytest.raises(RuntimeError):
        fit(cfg)
    monkeypatch.undo()
    assert fit(cfg)["status"] == "completed"


def test_interrupted_run_with_a_checkpoint_is_kept_unless_forced(tmp_path, monkeypatch):
    _fail_at_step(monkeypatch, 5)  # after the first epoch's checkpoint (2 batches per epoch)
    cfg = compose(SMOKE, LP + [f"run_dir={tmp_path}", "method.optim.epochs=3"])
    with pytest.raises(RuntimeError):
        fit(cfg)
    (tmp_path / "result.json").unlink()  # as a killed run leaves it: config and checkpoint, no record
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    other = compose(SMOKE, LP + [f"run_dir={tmp_path}", "method.optim.epochs=4"])
    with pytest.raises(ConfigError, match=r"interrupted run with a different config \(method.optim.epochs: 3 -> 4\)"):
        fit(other)
    res = fit(other, force=True)
    assert res["status"] == "completed" and res["resumed_from_epoch"] is None and res["epochs"] == 4


def test_bad_config_leaves_nothing_behind(cli, tmp_path):
    run = tmp_path / "r"
    out = cli("fit", SMOKE, *LP, "method.optim.name=sgdd", f"run_dir={run}")
    assert out.returncode == 2 and "sgdd" in out.stderr
    assert not run.exists()
    out = cli("fit", SMOKE, *LP, "method.optim.name=sgd", f"run_dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]


# --------------------------------------------------------------------------- filesystem
def test_run_dir_below_a_file_or_in_proc_fails_fast_naming_it(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"run_dir {blocker}/run: {blocker} is a file"):
        fit(compose(SMOKE, LP + [f"run_dir={blocker / 'run'}"]))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"run_dir /proc/prompttune-run cannot be written"):
        fit(compose(SMOKE, LP + ["run_dir=/proc/prompttune-run"]))
    assert time.perf_counter() - t0 < 2.0  # before any model or data is built


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_run_dir_without_write_permission(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"run_dir .*ro/run cannot be written"):
            fit(compose(SMOKE, LP + [f"run_dir={ro / 'run'}"]))
    finally:
        ro.chmod(0o700)


def test_cli_filesystem_error_exits_2(cli, tmp_path):
    (tmp_path / "f").write_text("")
    out = cli("fit", SMOKE, *LP, f"run_dir={tmp_path / 'f' / 'run'}")
    assert out.returncode == 2 and "is a file" in out.stderr and "run_dir" in out.stderr


# --------------------------------------------------------------------------- checkpoints of the wrong shape
def test_checkpoint_of_another_shape_is_rejected_saying_what_it_holds(tmp_path):
    four = ["method=coop", "method.n_ctx=4", "trainer.cpu_threads=1"]
    fit(compose(SMOKE, four + [f"run_dir={tmp_path / 'a'}"]))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    eight = compose(SMOKE, ["method=coop", "method.n_ctx=8", "trainer.cpu_threads=1", f"run_dir={tmp_path / 'b'}"])
    with pytest.raises(ConfigError, match=r"prompt_learner.ctx 4x128 \(expected 8x128\).*expects prompt_learner.ctx 8x128"):
        evaluate(eight, str(ckpt))
    # the same on resume: a run dir whose checkpoint came from elsewhere
    prepare_run_dir(eight, tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    with pytest.raises(ConfigError, match=r"checkpoint to resume from .* does not fit method 'coop'"):
        fit(eight)


def test_test_command_with_a_missing_or_foreign_checkpoint(cli, tmp_path):
    out = cli("test", SMOKE, *LP, "--checkpoint", tmp_path / "none.ckpt")
    assert out.returncode == 2 and "none.ckpt" in out.stderr and "not found" in out.stderr
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    out = cli("test", SMOKE, *LP, "--checkpoint", junk)
    assert out.returncode == 2 and "junk.ckpt" in out.stderr


# --------------------------------------------------------------------------- model selection
SEL = LP + ["method.optim.epochs=4", "method.optim.lr=0.05", "trainer.limit_test_batches=null",
            "data.eval_batch_size=256"]


def _best(rows, key, mode="max"):
    vals = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    best = None
    for e, v in vals:  # strictly better: ties keep the earliest epoch
        if best is None or (v > best[1] if mode == "max" else v < best[1]):
            best = (e, v)
    return best, vals


def test_select_test_reports_the_best_epoch_on_the_test_split(tmp_path):
    res = fit(compose(SMOKE, SEL + [f"run_dir={tmp_path}", "select=test"]))
    (epoch, value), per_epoch = _best(_rows(tmp_path)[:-1], "test/acc")  # the last row is the final test
    assert len(per_epoch) == 4  # evaluated after every epoch
    assert res["select"] == "test" and res["select_metric"] == "test/acc" and res["best_epoch"] == epoch
    assert res["select_score"] == pytest.approx(value)
    assert res["metrics"]["test/acc"] == pytest.approx(value)  # the best epoch's weights, tested again
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == epoch and set(best["state_dict"]) == {"method.head.weight", "method.head.bias"}
    again = evaluate(compose(SMOKE, SEL + [f"run_dir={tmp_path}", "select=test"]))  # defaults to best.ckpt
    assert again["test/acc"] == pytest.approx(value)


def test_select_val_tests_the_best_val_epoch(tmp_path):
    res = fit(compose(SMOKE, SEL + [f"run_dir={tmp_path}", "select=val", "select_metric=val/acc"]))
    (epoch, value), per_epoch = _best(_rows(tmp_path), "val/acc")
    assert len(per_epoch) == 4 and res["best_epoch"] == epoch and res["select_score"] == pytest.approx(value)
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    tested = evaluate(compose(SMOKE, SEL + [f"run_dir={tmp_path}", "select=val", "select_metric=val/acc"]),
                      str(tmp_path / "checkpoints" / "best.ckpt"))
    assert tested["test/acc"] == pytest.approx(res["metrics"]["test/acc"])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    if epoch != 3:  # the reported state is the best epoch's, not the last one's
        assert not torch.equal(best["method.head.weight"], last["method.head.weight"])


def test_select_last_records_the_final_epoch_and_no_score(tmp_path):
    res = fit(compose(SMOKE, LP + [f"run_dir={tmp_path}", "method.optim.epochs=2"]))
    assert res["select"] == "last" and res["best_epoch"] == 1 and res["select_metric"] is None
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    assert not any(r.get("val/acc") for r in _rows(tmp_path))  # no per-epoch validation


def test_select_metric_naming_the_other_split_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"select_metric='test/acc' names the 'test' split.*'val/acc'"):
        fit(compose(SMOKE, LP + [f"run_dir={tmp_path}", "select=val", "select_metric=test/acc"]))
    assert not tmp_path.joinpath("config.yaml").exists()


def test_select_val_without_a_val_split_is_an_error_before_training():
    from types import SimpleNamespace

    from prompttune.runs import _check_val_split

    cfg = compose(SMOKE, LP + ["select=val"])
    dm = SimpleNamespace(datasets={"train": [1], "test": [1]})
    with pytest.raises(ConfigError, match=r"select='val' needs a validation split.*has: train, test"):
        _check_val_split(cfg, dm)
    _check_val_split(compose(SMOKE, LP), dm)  # select: last needs none


def test_result_records_the_protocol_block(tmp_path):
    exp = {"protocol": {"paper": "P", "code": "o/r", "headline": {"metric": "test/acc", "value": 1.0}},
           "backbone": {"weights": "random"}, "method": "linear_probe",
           "data": {"batch_size": 8, "eval_batch_size": 64}, "trainer": {"limit_train_batches": 2,
                                                                          "limit_test_batches": 2}}
    cfg = compose(exp, ["method.optim.epochs=1", f"run_dir={tmp_path}"])
    res = fit(cfg)
    assert res["protocol"]["paper"] == "P" and res["protocol"]["headline"]["value"] == 1.0


# --------------------------------------------------------------------------- CSV history
def test_csv_logger_appends_to_and_widens_an_existing_history(tmp_path):
    from prompttune.run_callbacks import ResumableCSVLogger, trim_metrics_after

    first = ResumableCSVLogger(str(tmp_path), name="logs", version="")
    first.log_metrics({"epoch": 0, "train/loss": 1.0}, step=0)
    first.log_metrics({"epoch": 1, "train/loss": 0.5}, step=1)
    first.save()
    assert trim_metrics_after(tmp_path / "logs" / "metrics.csv", 0) == 1  # epoch 1 will be trained again
    second = ResumableCSVLogger(str(tmp_path), name="logs", version="")
    second.log_metrics({"epoch": 1, "train/loss": 0.4}, step=1)
    second.save()
    second.log_metrics({"epoch": 1, "val/acc": 0.9}, step=1)  # a new column: the header widens
    second.save()
    rows = _rows(tmp_path)
    assert [(r["epoch"], r["train/loss"], r["val/acc"]) for r in rows] == [("0", "1.0", ""), ("1", "0.4", ""),
                                                                           ("1", "", "0.9")]


def test_fit_prints_one_line_per_epoch_without_a_terminal(cli, tmp_path):
    out = cli("fit", SMOKE, *LP, "method.optim.epochs=2", f"run_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"] and all(ln.endswith(" s") for ln in lines)
    assert json.loads(out.stdout)["best_epoch"] == 1


@pytest.mark.parametrize("env,zero", [({}, True), ({"LOCAL_RANK": "1"}, False), ({"RANK": "3"}, False),
                                      ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
                                      ({"SLURM_PROCID": "0", "LOCAL_RANK": "0"}, True)])
def test_only_rank_zero_prepares_the_run_dir(monkeypatch, tmp_path, env, zero):
    """DDP ranks > 0 run the same command (Lightning relaunches it); they must not write the run dir."""
    from prompttune.runs import is_rank_zero

    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert is_rank_zero() is zero
