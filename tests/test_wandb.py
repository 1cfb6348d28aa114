"""W&B never hangs a run and never records keys: no key or a bad key -> offline, said aloud."""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef01234567"


def _fit(run_dir, env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    e.update(env)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "prompttune", "fit", str(REPO / "experiments/smoke.yaml"),
                          "method=linear_probe", "wandb.enabled=true", f"run_dir={run_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=400, env=e)
    return out, time.time() - t0


def test_no_key_logs_offline(tmp_path):
    out, _ = _fit(tmp_path / "r", {"HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no W&B API key" in out.stderr
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "r" / "result.json").is_file()


def test_bad_key_without_network_falls_back_and_keeps_the_key_secret(tmp_path):
    out, secs = _fit(tmp_path / "r", {"HOME": str(tmp_path), "WANDB_API_KEY": KEY, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "logging offline instead" in out.stderr
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    for f in (tmp_path / "r").rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert KEY not in f.read_bytes().decode("latin-1"), f
