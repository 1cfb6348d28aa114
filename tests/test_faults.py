"""Fault injection in subprocesses: SIGKILL mid-training, then rerun the same command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    assert "(resuming)" in out.stderr and "completed, skipped" in out.stderr
    assert "2 completed runs" in (runs / "report.md").read_text()
