"""Sweeps at scale: claims, --jobs, concurrent sweeps, W&B agent commands, SLURM (submitit),
signals, DDP ranks, failed and stale runs."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prompttune.config import ConfigError
from prompttune.launchers import job_env, sbatch_script
from prompttune.sweep import (Claim, expand, find_point, is_claimed, is_follower, load_sweep, plan, run_sweep,
                              wandb_sweep_specs)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep_file(tiny_sweep):
    """conftest's ``tiny_sweep`` with one thread per run and a ``minimize`` goal (which the W&B
    sweep config must carry)."""
    return functools.partial(tiny_sweep, cpu_threads=1, report="{metric: test/acc, goal: minimize}")


def _env(**kw):
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **kw)
    return e


def _cli(*args, cwd=REPO, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "prompttune", *map(str, args)], cwd=cwd, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# --------------------------------------------------------------------------- claims
_HOLD = """
import sys, time
from prompttune.sweep import Claim
c = Claim(sys.argv[1]); print(c.acquire(), flush=True); time.sleep(60)
"""


def test_claim_is_exclusive_and_a_dead_holders_claim_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    assert is_claimed(tmp_path / "r")
    assert not Claim(tmp_path / "r").acquire()  # held by a live process: not ours
    assert "pid" in (tmp_path / "r" / ".claim.holder").read_text()
    holder.kill()  # SIGKILL: no cleanup code runs; the OS drops the lock
    holder.wait()
    assert not is_claimed(tmp_path / "r")
    c = Claim(tmp_path / "r")
    assert c.acquire()
    assert not Claim(tmp_path / "r").acquire()  # exclusive within one process too
    c.release()
    assert not is_claimed(tmp_path / "r")


def test_job_env_gives_each_job_its_device_or_threads():
    env, extra = job_env(1, 4, ["0", "1", "2", "3", "4", "5", "6", "7"])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and extra == ["trainer.devices=2"]
    env, extra = job_env(2, 4, ["4", "5", "6", "7"])
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and extra == []
    cores = len(os.sched_getaffinity(0))
    env, extra = job_env(0, 2, [])
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2)) and extra == [f"trainer.cpu_threads={max(1, cores // 2)}"]


def test_is_follower_only_on_nonzero_ranks(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert not is_follower()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not is_follower()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert is_follower()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")  # an array task alone in its allocation is not a rank
    assert not is_follower()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert is_follower()


# --------------------------------------------------------------------------- W&B sweep configs
UNION = """[{method: [zero_shot, linear_probe]},
        {method: [linear_probe], method.normalize: [false]},
        {method: [linear_probe], method.optim.lr: [0.1, 0.001]}]"""


def test_union_sweep_gives_one_wandb_config_per_subgrid(tmp_path, sweep_file):
    f = sweep_file(grid=UNION, seeds="[0, 1]")
    f.write_text(f.read_text().replace("goal: minimize", ""))
    block, runs = plan(f, runs_dir="/tmp/x")
    specs = wandb_sweep_specs(block, Path("/tmp/x"))
    assert len(runs) == 10 and len(specs) == 3
    names = set()
    for spec in specs:
        assert spec["method"] == "grid"
        assert spec["metric"] == {"name": "test/acc", "goal": "maximize"}  # goal defaults to maximize
        cmd = spec["command"]
        assert cmd[:5] == ["${env}", "${interpreter}", "-m", "prompttune", "sweep"] and cmd[-2] == str(f)
        assert cmd[-1] == "${args_no_hyphens}" and "--point" in cmd and "--wandb" in cmd
        assert cmd[cmd.index("--runs-dir") + 1] == "/tmp/x"
        keys = list(spec["parameters"])
        grid = {k: v["values"] for k, v in spec["parameters"].items() if k != "seed"}
        for p in expand({"grid": [grid], "seeds": spec["parameters"]["seed"]["values"]}):
            # what `wandb agent` passes: key=str(value), e.g. method.normalize=False
            run, rest = find_point(block, runs, [f"{k}={p[k]}" for k in keys])
            assert rest == [] and run["point"] == p
            names.add(run["name"])
    # every local run is reachable from the W&B sweeps, and no sub-grid's keys leak into another's
    assert len(names) == 10 and specs[1]["parameters"]["method.normalize"] == {"values": [False]}
    assert "method.optim.lr" not in specs[1]["parameters"]
    with pytest.raises(ConfigError, match="is not a point of sweep"):
        find_point(block, runs, ["method=linear_probe", "seed=7"])


def test_seeds_option_widens_the_seed_list_everywhere_a_point_is_named(tmp_path, sweep_file, capsys):
    """`--seeds N` runs seeds 0..N-1 instead of the file's; the W&B agents' command passes it on, so
    their `--point ... seed=2` is a point of the sweep, and without it that seed is refused."""
    f = sweep_file(seeds="[0]")
    block, runs = plan(f, runs_dir="/tmp/x", seeds=3)
    assert len(runs) == 6 and sorted({r["point"]["seed"] for r in runs}) == [0, 1, 2]
    (spec,) = wandb_sweep_specs(block, Path("/tmp/x"))
    assert spec["parameters"]["seed"] == {"values": [0, 1, 2]}
    cmd = spec["command"]
    assert cmd[cmd.index("--seeds") + 1] == "3" and cmd.index("--seeds") < cmd.index(str(f))
    run, _ = find_point(block, runs, ["method=linear_probe", "seed=2"])
    assert run["name"].endswith("s2")
    plain_block, plain_runs = plan(f, runs_dir="/tmp/x")
    assert "--seeds" not in wandb_sweep_specs(plain_block, Path("/tmp/x"))[0]["command"]
    with pytest.raises(ConfigError, match="is not a point of sweep"):
        find_point(plain_block, plain_runs, ["method=linear_probe", "seed=2"])
    from prompttune.cli import main

    assert main(["sweep", str(f), "--seeds", "0", "--dry-run"]) == 2
    assert "--seeds must be a whole number >= 1 (seeds 0..N-1), got 0" in capsys.readouterr().err
    assert main(["sweep", str(f), "--seeds", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method=linear_probe,s1" in out and "4 runs" in out


def test_shipped_sweep_is_named_relative_to_the_repo():
    from prompttune.sweep import agent_sweep_ref, sweep_path

    assert agent_sweep_ref(REPO / "experiments/demo_clip.yaml") == "experiments/demo_clip.yaml"
    cwd = os.getcwd()
    try:
        os.chdir("/")
        assert sweep_path("experiments/demo_clip.yaml") == REPO / "experiments/demo_clip.yaml"
    finally:
        os.chdir(cwd)


def test_agent_command_runs_a_point_from_any_directory(tmp_path, sweep_file):
    """Run the exact command `wandb agent` would run for one point, with W&B's substitutions,
    from an unrelated directory; it trains that point into the sweep's own run directory."""
    f = sweep_file()
    assert run_sweep(f, dry_run=True, wandb=True) == 0  # writes the W&B sweep config, runs nothing
    spec = yaml.safe_load((tmp_path / "runs" / "wandb_sweep.yaml").read_text())
    assert spec["metric"] == {"name": "test/acc", "goal": "minimize"}
    assert spec["parameters"] == {"method": {"values": ["zero_shot", "linear_probe"]}, "seed": {"values": [0, 1]}}
    subst = {"${env}": ["/usr/bin/env"], "${interpreter}": ["python"],  # wandb_agent.py's substitutions
             "${args_no_hyphens}": ["method=linear_probe", "seed=1"]}
    cmd = [x for c in spec["command"] for x in subst.get(c, [c])]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path))
    res = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    rdir = tmp_path / "runs" / "method=linear_probe,s1"
    rec = json.loads((rdir / "result.json").read_text())
    assert rec["status"] == "completed" and rec["method"] == "linear_probe" and rec["seed"] == 1
    cfg = yaml.safe_load((rdir / "config.yaml").read_text())
    assert cfg["wandb"]["enabled"] is True and cfg["wandb"]["group"] == "t/method=linear_probe"
    assert list(rdir.glob("wandb/offline-run-*"))  # logging on
    assert not list(elsewhere.iterdir())  # nothing written where the agent happened to start
    assert "method=linear_probe,s1: completed" in res.stdout


# --------------------------------------------------------------------------- parallel and concurrent
@pytest.mark.slow  # subprocesses: ~1-2 min on 2 shared cores
def test_jobs_and_a_second_sweep_train_every_run_once(tmp_path, sweep_file):
    """`--jobs 2` and a plain `sweep` on the same runs_dir at once: each of the 4 runs is trained by
    exactly one of the three workers; the others see it claimed or completed."""
    f = sweep_file(epochs=2)
    a = _cli("sweep", f, "--jobs", "2", "--no-report")
    time.sleep(1.0)
    b = _cli("sweep", f, "--no-report")
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (err_a[-2000:], err_b[-2000:])
    trained = re.findall(r"\] (\S+)  completed \(", out_a + out_b)
    assert sorted(trained) == sorted(["method=zero_shot,s0", "method=zero_shot,s1", "method=linear_probe,s0",
                                      "method=linear_probe,s1"]), f"--jobs 2:\n{out_a}\nplain:\n{out_b}"
    by_jobs = re.findall(r"\] (\S+)  completed \(", out_a)
    for d in (tmp_path / "runs").iterdir():
        if d.is_dir():
            rec = json.loads((d / "result.json").read_text())
            assert rec["status"] == "completed" and rec.get("resumed_from_epoch") is None  # started once
            if d.name in by_jobs:  # a --jobs child: its own process, cores/jobs threads
                log = (d / "sweep_job.log").read_text()
                assert "completed" in log
                assert yaml.safe_load((d / "config.yaml").read_text())["trainer"]["cpu_threads"] == \
                    max(1, len(os.sched_getaffinity(0)) // 2)


# --------------------------------------------------------------------------- failed and stale runs
def test_failed_point_is_skipped_until_retry_failed(tmp_path, capsys, sweep_file):
    f = sweep_file(grid="{method: [zero_shot]}", seeds="[0]")
    _, runs = plan(f)
    rdir = runs[0]["dir"]
    rdir.mkdir(parents=True)
    from omegaconf import OmegaConf

    (rdir / "config.yaml").write_text(OmegaConf.to_yaml(runs[0]["cfg"]))
    (rdir / "result.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: flaky node"}))
    assert run_sweep(f, report=False) == 0
    assert "skipped  failed before (--retry-failed reruns it)" in capsys.readouterr().out
    assert json.loads((rdir / "result.json").read_text())["status"] == "failed"
    assert run_sweep(f, report=False, retry_failed=True) == 0
    assert json.loads((rdir / "result.json").read_text())["status"] == "completed"


def test_completed_run_of_another_config_is_an_error_up_front(tmp_path, sweep_file):
    f = sweep_file(grid="{method: [zero_shot]}", seeds="[0, 1]")
    _, runs = plan(f, ["data.shots=2"])
    from omegaconf import OmegaConf

    d = runs[1]["dir"]
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(runs[1]["cfg"]))
    (d / "result.json").write_text(json.dumps({"status": "completed", "metrics": {"test/acc": 0.5}}))
    with pytest.raises(ConfigError, match=r"1 completed run\(s\) .* different config .*data.shots: 2 -> "):
        run_sweep(f, report=False)
    assert not (runs[0]["dir"]).exists()  # nothing ran


def test_grid_over_an_inert_key_fails_before_any_run(tmp_path, sweep_file):
    from prompttune.methods.coop import CoOp

    if "check_config" not in vars(CoOp):
        pytest.skip("CoOp.check_config (n_ctx vs ctx_init) has not landed yet")
    f = sweep_file(grid="{method: [coop], method.n_ctx: [2, 4]}", seeds="[0]")
    with pytest.raises(ConfigError) as err:
        plan(f, ["method.ctx_init=a photo of a"])
    assert "n_ctx" in str(err.value) and "ctx_init" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_load_sweep_rejects_bad_report_goal_and_seed_in_grid(tmp_path, sweep_file):
    f = sweep_file()
    f.write_text(f.read_text().replace("goal: minimize", "goal: maximise"))
    with pytest.raises(ConfigError, match="sweep.report.goal .* 'maximise'; expected one of maximize, minimize"):
        load_sweep(f)
    f2 = sweep_file(grid="{seed: [0, 1]}", name="u")
    with pytest.raises(ConfigError, match="put seeds in sweep.seeds"):
        load_sweep(f2)


# --------------------------------------------------------------------------- SLURM through submitit
def test_sbatch_script_of_the_array(tmp_path):
    text = sbatch_script(tmp_path / "slurm", 4, {"partition": "gpu", "gpus_per_task": 1, "cpus_per_task": 8,
                                                 "time": 30, "array_parallelism": 2, "account": "lab",
                                                 "setup": ["source .venv/bin/activate"]})
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=30", "#SBATCH --account=lab",
                 "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1", "source .venv/bin/activate",
                 "submitit.core._submit"):
        assert line in text, (line, text)


@pytest.mark.slow  # subprocesses: ~1-2 min on 2 shared cores
def test_slurm_launcher_with_the_local_executor(tmp_path, sweep_file):
    """submitit's local executor runs the array's tasks as processes; together they train every run
    once, each task claiming runs until none is left."""
    from prompttune.launchers import submit_slurm

    f = sweep_file(grid="{method: [linear_probe]}", seeds="[0, 1, 2]")
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        jobs = submit_slurm(f, [], {"array_parallelism": 2, "time": 10, "slurm_dir": tmp_path / "slurm"},
                            cluster="local")
        results = [j.result() for j in jobs]
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert len(jobs) == 2
    trained = [name for r in results for name, status in r.items() if status == "completed"]
    assert sorted(trained) == ["method=linear_probe,s0", "method=linear_probe,s1", "method=linear_probe,s2"]
    for name in trained:
        assert json.loads((tmp_path / "runs" / name / "result.json").read_text())["status"] == "completed"


# --------------------------------------------------------------------------- signals
def _wait_for(path: Path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow  # subprocesses: ~1-2 min on 2 shared cores
@pytest.mark.parametrize("sig,jobs", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_signal_stops_the_sweep_nonzero_and_rerun_resumes(tmp_path, sig, jobs, sweep_file):
    """SIGTERM (SLURM time limit, preemption) or SIGINT (Ctrl-C) mid-run, to a `--jobs 2` parent
    (passed on to its children) or a plain sweep: exit 128+signal with the resume hint, no record
    written for the interrupted run, its claim released (resuming it is runs.fit's, tested in test_runs)."""
    f = sweep_file(grid="{method: [linear_probe]}", seeds="[0, 1]", epochs=200)
    p = _cli("sweep", f, "--jobs", jobs, "--no-report")
    _wait_for(tmp_path / "runs" / "method=linear_probe,s0" / "checkpoints" / "last.ckpt", p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, (p.returncode, err[-3000:])
    assert "interrupted; run the same command again to resume" in err
    assert not (tmp_path / "runs" / "method=linear_probe,s0" / "result.json").exists()
    assert not is_claimed(tmp_path / "runs" / "method=linear_probe,s0")


# --------------------------------------------------------------------------- long-lived --jobs workers
def _worker_pids(rdir: Path) -> list[int]:
    return [int(x) for x in re.findall(r"sweep worker \d+ \(pid (\d+)\)", (rdir / "sweep_job.log").read_text())]


@pytest.mark.slow  # subprocesses: ~1-2 min on 2 shared cores
def test_jobs_workers_train_run_after_run_and_a_dead_worker_costs_its_run_only(tmp_path, sweep_file):
    """`--jobs 2` starts two long-lived workers that each train run after run (start-up paid once per
    worker, not per run). SIGKILL to the worker of the long run (the OOM killer, a segfault): that run
    is reported interrupted and left resumable, the others complete, and the sweep exits 1."""
    f = sweep_file(grid="[{method: [linear_probe], method.optim.epochs: [400]}, "
                              "{method: [linear_probe], method.optim.lr: [0.1, 0.01, 0.001]}]", seeds="[0]")
    p = _cli("sweep", f, "--jobs", 2, "--no-report")
    long = tmp_path / "runs" / "method=linear_probe,epochs=400,s0"
    _wait_for(long / "checkpoints" / "last.ckpt", p)
    pid = int(re.search(r"pid (\d+)", (long / ".claim.holder").read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1, (out, err[-3000:])
    assert re.search(r"\] method=linear_probe,epochs=400,s0  interrupted \([\d.]+ s\)  its worker exited with signal SIGKILL; "
                     r"rerun resumes", out), out
    assert not (long / "result.json").exists() and not is_claimed(long)  # resumable: no record, no claim
    quick = [tmp_path / "runs" / f"method=linear_probe,lr={lr},s0" for lr in (0.1, 0.01, 0.001)]
    pids = []
    for d in quick:
        assert json.loads((d / "result.json").read_text())["status"] == "completed"
        assert re.search(rf"\] {re.escape(d.name)}  completed \(", out)
        assert yaml.safe_load((d / "config.yaml").read_text())["trainer"]["cpu_threads"] == \
            max(1, len(os.sched_getaffinity(0)) // 2)
        pids += _worker_pids(d)
    assert len(pids) == 3 and pid not in pids  # each quick run trained once, none by the killed worker
    assert len(set(pids)) < len(pids), pids  # a worker trained several runs: one process, run after run
    assert _worker_pids(long) == [pid]


def _launcher_children() -> list[int]:
    """Live (not reaped) child processes of this one that are --jobs workers."""
    kids = []
    for d in Path("/proc").iterdir():
        try:
            status = (d / "status").read_text()
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if re.search(rf"^PPid:\s+{os.getpid()}$", status, flags=re.M) and b"prompttune.launchers" in cmd:
            kids.append(int(d.name))
    return kids


def test_jobs_with_nothing_to_train_or_a_bad_grid_leaves_no_worker(tmp_path, capsys, sweep_file):
    """The workers start before the grid is composed: a grid that is all done, or that fails
    validation, must end them at once (nothing imported for nothing, nothing left behind)."""
    f = sweep_file(grid="{method: [zero_shot]}", seeds="[0, 1]")
    from omegaconf import OmegaConf

    for run in plan(f)[1]:
        run["dir"].mkdir(parents=True)
        (run["dir"] / "config.yaml").write_text(OmegaConf.to_yaml(run["cfg"]))
        (run["dir"] / "result.json").write_text(json.dumps({"status": "completed", "metrics": {"test/acc": 0.5}}))
    assert run_sweep(f, jobs=2, report=False) == 0
    out = capsys.readouterr().out
    assert out.count("skipped  completed") == 2 and "failed" not in out, out
    assert _launcher_children() == []
    with pytest.raises(ConfigError, match="method.optim.lr"):
        run_sweep(f, jobs=2, report=False, runs_dir=tmp_path / "other", extra=["method.optim.lr=-1"])
    assert _launcher_children() == [] and not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- a sweep under DDP
@pytest.mark.slow  # a 2-process gloo DDP job in a subprocess: ~1-2 min on 2 shared cores
def test_ddp_sweep_trains_each_point_once_and_reports_once(tmp_path, sweep_file):
    """`prompttune sweep` under a 2-process CPU DDP job (Lightning relaunches the same command as
    rank 1): rank 0 alone claims, records, prints progress and the report; rank 1 trains each point
    alongside it, exactly once, so every result.json is one 2-device run."""
    f = sweep_file(grid="{method: [linear_probe]}", seeds="[0, 1]")
    p = _cli("sweep", f, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, (out, err[-3000:])
    names = ["method=linear_probe,s0", "method=linear_probe,s1"]
    for n in names:
        assert len(re.findall(rf"\] {re.escape(n)}  completed \(", out)) == 1, out  # one progress line
        assert err.count(f"{n}: rank 1 trains it alongside rank 0") == 1, err[-3000:]  # rank 1 trained it once
        rec = json.loads((tmp_path / "runs" / n / "result.json").read_text())
        assert rec["status"] == "completed" and rec["devices"] == 2 and rec["resumed_from_epoch"] is None
    assert len(re.findall(r"^\[\d/2\] ", out, flags=re.M)) == 2  # rank 1 printed no progress of its own
    assert out.count("# Report: ") == 1 and (tmp_path / "runs" / "report.md").is_file()
    assert json.loads((tmp_path / "runs" / "sweep.json").read_text())["runs"] == names
