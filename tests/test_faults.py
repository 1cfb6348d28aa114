"""Fault injection in subprocesses: SIGKILL mid-training, then rerun the same command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments/smoke.yaml"
ARGS = ["method=linear_probe", "data.shots=4", "data.batch_size=8", "method.optim.epochs=25",
        "trainer.limit_train_batches=null", "trainer.deterministic=true", "seed=3"]


def _cmd(*args):
    return [sys.executable, "-m", "prompttune", *map(str, args)]


def _run(*args, timeout=600):
    out = subprocess.run(_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _kill_after_checkpoint(args, ckpt: Path, timeout=600):
    proc = subprocess.Popen(_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.time()
    while not ckpt.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _weights(run: Path):
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_sigkill_then_rerun_resumes_to_the_same_result(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run("fit", SMOKE, *ARGS, f"run_dir={ref}")
    _kill_after_checkpoint(["fit", SMOKE, *ARGS, f"run_dir={killed}"], killed / "checkpoints" / "last.ckpt")
    assert not (killed / "result.json").exists()  # no half-written record
    epoch_at_kill = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert epoch_at_kill < 24
    out = _run("fit", SMOKE, *ARGS, f"run_dir={killed}")
    assert "resuming from" in out.stderr
    a, b = json.loads((ref / "result.json").read_text()), json.loads((killed / "result.json").read_text())
    assert a["metrics"] == b["metrics"]
    for k, v in _weights(ref).items():
        torch.testing.assert_close(_weights(killed)[k], v, rtol=0, atol=1e-6)


def test_sweep_killed_midway_redoes_nothing_and_resumes(tmp_path):
    sweep = tmp_path / "sw.yaml"
    runs = tmp_path / "runs"
    sweep.write_text(f"""sweep:
  name: k
  runs_dir: {runs}
  grid: {{method: [zero_shot, linear_probe]}}
  seeds: [0]
backbone: {{weights: random}}
data: {{shots: 4, batch_size: 8}}
method: {{optim: {{epochs: 25}}}}
trainer: {{limit_test_batches: 1, deterministic: true}}
""")
    done = runs / "method=zero_shot,s0" / "result.json"
    _kill_after_checkpoint(["sweep", sweep], runs / "method=linear_probe,s0" / "checkpoints" / "last.ckpt")
    assert done.exists() and not (runs / "method=linear_probe,s0" / "result.json").exists()
    stamp = json.loads(done.read_text())["finished_at"]
    out = _run("sweep", sweep)
    assert json.loads(done.read_text())["finished_at"] == stamp  # not redone
    assert json.loads((runs / "method=linear_probe,s0" / "result.json").read_text())["status"] == "completed"
    assert "resuming from" in out.stderr  # the interrupted run resumed (the sweep's own wording is sweep's)
    assert "2 completed runs" in (runs / "report.md").read_text()


# --------------------------------------------------------------------------- SIGTERM / SIGINT
SLOW = [*ARGS[:3], "method.optim.epochs=150", *ARGS[4:]]  # ~10 s of training: time to signal it


def _csv_rows(run: Path) -> list[dict]:
    import csv

    with open(run / "logs" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _signal_after_checkpoint(args, ckpt: Path, signum, timeout=600):
    """Start a real `prompttune fit`, wait until an epoch is checkpointed, send ``signum`` (SIGINT to
    the process group, as a terminal's Ctrl-C does; SIGTERM to the process, as SLURM and `kill` do)."""
    proc = subprocess.Popen(_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.time()
    while not ckpt.exists():
        assert proc.poll() is None, "the run ended before it could be signalled:\n" + proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    (os.killpg if signum == signal.SIGINT else os.kill)(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143),
                                         pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_checkpoints_exits_nonzero_and_the_rerun_resumes_with_history(tmp_path, signum, code):
    ref = tmp_path / "ref"
    _run("fit", SMOKE, *SLOW, f"run_dir={ref}")
    ref_res = json.loads((ref / "result.json").read_text())
    ref_rows = _csv_rows(ref)
    run = tmp_path / signum.name
    rc, err = _signal_after_checkpoint(["fit", SMOKE, *SLOW, f"run_dir={run}"], run / "checkpoints" / "last.ckpt",
                                       signum)
    assert rc == code, (signum.name, rc, err[-3000:])
    assert "interrupted; run the same command again to resume" in err, err[-2000:]
    assert not (run / "result.json").exists()  # no record, let alone a completed one
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 <= ckpt["epoch"] < 149 and ckpt["prompttune"]["train_time_s"] > 0
    before = _csv_rows(run)
    assert before and max(int(r["epoch"]) for r in before) <= ckpt["epoch"] + 1

    out = _run("fit", SMOKE, *SLOW, f"run_dir={run}")
    assert "resuming from" in out.stderr
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "completed" and res["resumed_from_epoch"] == ckpt["epoch"]
    # the same training as without the interrupt: weights, metrics, and the whole CSV history
    assert res["metrics"] == ref_res["metrics"]
    for k, v in _weights(ref).items():
        torch.testing.assert_close(_weights(run)[k], v, rtol=0, atol=1e-6)
    rows = _csv_rows(run)
    assert len(rows) == len(ref_rows), (len(rows), len(ref_rows))
    assert [(r["epoch"], r["step"]) for r in rows] == [(r["epoch"], r["step"]) for r in ref_rows]
    # train time accumulates across the two sessions (the first session's part is in the checkpoint)
    # (not compared with the reference's time: other processes share these cores)
    assert res["train_time_s"] > ckpt["prompttune"]["train_time_s"] > 0


def test_signal_outside_training_stops_at_once_and_handlers_are_restored():
    """Before a Trainer exists (building the model and data) there is no batch to finish: the signal
    raises RunInterrupted (exit code 128 + signal) at once; after the run, the old handlers are back."""
    from prompttune.runs import RunInterrupted, _Interrupts

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info, _Interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert info.value.exit_code == 143 and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_first_signal_during_training_asks_lightning_to_stop_after_the_batch():
    from prompttune.runs import _Interrupts

    class FakeTrainer:
        should_stop = False

    with _Interrupts() as guard:
        guard.trainer = FakeTrainer()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert guard.trainer.should_stop and guard.signum == signal.SIGINT
