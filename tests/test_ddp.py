"""2-process DDP on the CPU (gloo) trains and agrees with one process.

Run as subprocesses of the CLI with a timeout: `strategy="ddp"` inside the pytest process
would relaunch pytest itself as the second rank. Full-batch training (32 samples: one
batch of 32 on one process, 16 per rank on two) makes the two runs the same computation,
so the trained weights must agree to float tolerance.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMMON = ["method=linear_probe", "data.shots=2", "method.optim.epochs=3", "trainer.limit_train_batches=null",
          "trainer.limit_test_batches=null", "data.eval_batch_size=100", "method.optim.lr=0.05"]


def _fit(run_dir, *extra):
    out = subprocess.run([sys.executable, "-m", "prompttune", "fit", str(REPO / "experiments/smoke.yaml"), *COMMON,
                          f"run_dir={run_dir}", *extra], cwd=REPO, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run_dir / "result.json").read_text())


def test_ddp_two_cpu_processes_agree_with_one(tmp_path):
    single = _fit(tmp_path / "single", "data.batch_size=32")
    ddp = _fit(tmp_path / "ddp", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16")
    assert ddp["devices"] == 2 and single["devices"] == 1
    w1 = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert set(w1) == set(w2) == {"method.head.weight", "method.head.bias"}
    assert w1["method.head.weight"].abs().sum() > 0  # it trained
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    assert abs(single["metrics"]["test/acc"] - ddp["metrics"]["test/acc"]) < 1e-6
