# Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_interrupts.py [OUT_DIR]   (from the repo root; ~5 min on 2 shared cores)
"""Interrupt a real `prompttune fit` with SIGTERM and with SIGINT once its first epoch is saved,
rerun it, and compare with an uninterrupted run: exit codes, files left, metrics.csv rows, train time."""
import csv, json, os, signal, subprocess, sys, time
from pathlib import Path

ARGS = ["experiments/smoke.yaml", "method=linear_probe", "data.shots=4", "data.batch_size=8",
        "method.optim.epochs=150", "trainer.limit_train_batches=null", "trainer.deterministic=true", "seed=3"]
out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/interrupts")
fit = [sys.executable, "-m", "prompttune", "fit", *ARGS]
rows = lambda d: len(list(csv.DictReader(open(d / "logs/metrics.csv"))))
res = lambda d: json.loads((d / "result.json").read_text())
subprocess.run([*fit, f"run_dir={out / 'ref'}"], capture_output=True, check=True)
print(f"uninterrupted: rows={rows(out / 'ref')} train_time_s={res(out / 'ref')['train_time_s']} "
      f"metrics={res(out / 'ref')['metrics']}")
for sig in (signal.SIGTERM, signal.SIGINT):
    d = out / sig.name
    p = subprocess.Popen([*fit, f"run_dir={d}"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    while not (d / "checkpoints/last.ckpt").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    (os.killpg if sig == signal.SIGINT else os.kill)(p.pid, sig)
    err = p.communicate()[1]
    left = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file())
    print(f"{sig.name}: rc={p.returncode} message={err.strip().splitlines()[-1]!r}")
    print(f"  left on disk: {left}; metrics.csv rows {rows(d)}")
    r = subprocess.run([*fit, f"run_dir={d}"], capture_output=True, text=True)
    print(f"  rerun: rc={r.returncode} rows={rows(d)} train_time_s={res(d)['train_time_s']} "
          f"resumed_from_epoch={res(d)['resumed_from_epoch']} metrics={res(d)['metrics']}")
