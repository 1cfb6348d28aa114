"""Launchers of a sweep's workers: ``--jobs N`` on one machine and ``--launcher slurm``.

``--jobs N`` starts N long-lived worker processes (``python -m prompttune.launchers``) first thing,
so that their start-up -- importing torch and Lightning, ~20 s on a loaded 2-core machine, more
than a smoke-sized run -- overlaps the parent's own while it composes the grid, and is paid once
per worker, not once per run. Each then trains run after run as the parent hands them out,
through the same claim as any other worker (:func:`prompttune.sweep.run_one`), so concurrent
sweeps, SLURM tasks and W&B agents on the same runs directory still train no run twice. Each
worker has its own GPU(s) (``CUDA_VISIBLE_DEVICES``) or cores/N torch threads, and its own
session: a terminal's Ctrl-C reaches it only through the parent, which passes SIGINT/SIGTERM on.
The parent composes the grid once and hands the workers the composed configs (a pickle in a
temporary file); it prints the progress lines and counts failures. A worker that dies inside a
run (a segfault, the OOM killer) costs that run only: the parent reports it and starts a new
worker for the rest.

Protocol, parent -> worker, on its stdin: one JSON setup line (``{"plan": file, "env": {GPUs}}``),
then one run name per line; end of input = stop. Worker -> parent, JSON lines on a dedicated pipe
(``--status-fd``): ``{"ready": true}`` once, then ``{"run", "status", "detail", "secs"}`` per run,
or ``{"interrupted": signum, "run"}``. A worker's output goes to ``<run dir>/sweep_job.log`` while
it trains that run; the parent keeps the tail of the rest and prints it if the worker dies.

``--launcher slurm`` submits a SLURM job array through submitit; each task claims runs until none
is left (:class:`SweepTask`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import pickle
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from prompttune.config import ConfigError
from prompttune.sweep import (Progress, SweepInterrupted, _SignalGuard, check_not_stale, is_claimed, plan, run_one,
                              run_state)
from prompttune.utils import atomic_write_json

log = logging.getLogger("prompttune")


# --------------------------------------------------------------------------- devices and threads per job
def _visible_gpus(runs: list[dict]) -> list[str]:
    """GPU ids the jobs may share out, or [] when the runs train on the CPU."""
    accels = {str(r["cfg"].trainer.accelerator) for r in runs}
    if accels <= {"cpu"}:
        return []
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [d for d in vis.split(",") if d.strip() not in ("", "-1")]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


def job_env(slot: int, jobs: int, gpus: list[str]) -> tuple[dict[str, str], list[str]]:
    """Environment and extra overrides for job ``slot`` of ``jobs``: its own GPU(s), or on the
    CPU cores/jobs torch threads (processes that share cores with torch's default thread count
    run many times slower)."""
    env = dict(os.environ)
    if gpus:
        per = max(1, len(gpus) // jobs)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * per:(slot + 1) * per])
        return env, [f"trainer.devices={per}"] if per > 1 else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env, [f"trainer.cpu_threads={threads}"]




def apply_job_overrides(runs: list[dict], jobs: int) -> list[str]:
    """Give every run the per-job share ``--jobs`` implies (``trainer.cpu_threads`` = cores/N, or
    ``trainer.devices`` = GPUs/N) in its composed config, so its config.yaml records what it ran
    with; returns the GPU ids the jobs share out ([] on the CPU). Fewer GPUs than jobs is an error."""
    from omegaconf import OmegaConf, open_dict

    gpus = _visible_gpus(runs)
    if gpus and len(gpus) < jobs:
        raise ConfigError(f"--jobs {jobs} but only {len(gpus)} GPU(s) are visible ({','.join(gpus)}); each job "
                          f"needs its own GPU: use --jobs {len(gpus)}, or trainer=cpu")
    _, extra = job_env(0, jobs, gpus)  # the same overrides for every slot; only the environment differs
    for run in runs:
        with open_dict(run["cfg"]):
            for item in extra:
                key, _, value = item.partition("=")
                OmegaConf.update(run["cfg"], key, yaml.safe_load(value), merge=False)
    return gpus


# --------------------------------------------------------------------------- --jobs N: the parent
class _Worker:
    """The parent's handle on one worker process: its stdin (setup, then run names), a thread that
    reads its status pipe into the pool's event queue, the tail of its own output, its current run."""

    def __init__(self, slot: int, env: dict, retry_failed: bool, events: queue.Queue):
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "prompttune.launchers", "--status-fd", str(write_fd), "--slot", str(slot)]
        cmd += ["--retry-failed"] if retry_failed else []
        self.slot = slot
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)  # the worker holds the write end now: end of file = the worker is gone
        self.output: collections.deque[str] = collections.deque(maxlen=40)  # outside runs (those log to a file)
        self.run: dict | None = None  # the run it trains now
        self.t0 = 0.0
        self.ready = self.started = self.closed = False
        for target, args in ((self._read, (os.fdopen(read_fd, "r"), events)), (self._drain, ())):
            threading.Thread(target=target, args=args, daemon=True).start()

    def _read(self, pipe, events: queue.Queue) -> None:
        with pipe:
            for line in pipe:
                with contextlib.suppress(ValueError):
                    events.put((self, json.loads(line)))
        events.put((self, None))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.decode("utf-8", "replace"))

    def _write(self, text: str) -> bool:
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):  # it died meanwhile: its end-of-file event follows
            return False

    def setup(self, plan_file: str, env: dict[str, str]) -> None:
        self._write(json.dumps({"plan": plan_file, "env": env}))

    def send(self, run: dict) -> bool:
        self.run, self.t0, self.ready = run, time.perf_counter(), False
        if not self._write(run["name"]):
            self.run = None
            return False
        return True

    def close(self) -> None:
        """No more runs: end its input; it exits once its current run (if any) is done."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def _next_run(todo: list[dict], progress: Progress, retry_failed: bool) -> dict | None:
    """The next run worth handing out; the ones done meanwhile or claimed elsewhere get their line."""
    while todo:
        run = todo.pop(0)
        state = run_state(run["dir"], run["cfg"])
        if state == "completed" or (state == "failed" and not retry_failed):
            progress.line(run["name"], "skipped", "completed" if state == "completed"
                          else "failed before (--retry-failed reruns it)")
            continue
        if is_claimed(run["dir"]):
            progress.line(run["name"], "busy", "claimed by another process")
            continue
        return run
    return None


class WorkerPool:
    """``--jobs N``: N long-lived worker processes. They are started before the parent composes the
    grid, so their start-up (importing torch and Lightning) overlaps the parent's; then :meth:`run`
    hands each free worker the next run until none is left. Use as a context manager: leaving it
    ends every worker (a sweep that fails up front leaves none behind)."""

    def __init__(self, jobs: int, retry_failed: bool = False):
        self.jobs, self.retry_failed = jobs, retry_failed
        self.events: queue.Queue = queue.Queue()
        self.workers: dict[int, _Worker] = {}
        self.plan_file: str | None = None
        self.gpus: list[str] = []
        for slot in range(jobs):
            self._start(slot)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        for w in self.workers.values():
            w.close()  # done: each exits at the end of its input
            if exc_type is not None and w.proc.poll() is None:
                if w.run is None:
                    w.proc.kill()  # the sweep failed before handing it a run (a bad grid): nothing to save
                else:
                    w.proc.terminate()  # an error in the parent: checkpoint the run and stop
        for w in self.workers.values():
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        if self.plan_file:
            Path(self.plan_file).unlink(missing_ok=True)
        return False

    def _start(self, slot: int) -> None:
        env, _ = job_env(slot, self.jobs, [])  # threads now; its GPUs (known once the grid is composed) in setup
        w = _Worker(slot, env, self.retry_failed, self.events)
        self.workers[slot] = w
        if self.plan_file:
            w.setup(self.plan_file, self._devices(slot))

    def _devices(self, slot: int) -> dict[str, str]:
        if not self.gpus:
            return {}
        env, _ = job_env(slot, self.jobs, self.gpus)
        return {"CUDA_VISIBLE_DEVICES": env["CUDA_VISIBLE_DEVICES"]}

    def run(self, runs: list[dict], gpus: list[str], progress: Progress, guard: _SignalGuard) -> int:
        """Train ``runs`` on the workers. Returns how many failed (or lost their worker); raises
        :class:`SweepInterrupted` once a signal has reached the parent and been passed on to the workers."""
        self.gpus = list(gpus)
        fd, self.plan_file = tempfile.mkstemp(prefix="prompttune-sweep-", suffix=".pkl")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(runs, fh)
        for slot, w in self.workers.items():
            if slot < progress.to_train:
                w.setup(self.plan_file, self._devices(slot))
            else:  # more workers than runs left to train: it would only import torch
                w.close()
                w.proc.kill()
        todo, failed = list(runs), 0

        def lost(w: _Worker, status: str, why: str) -> None:  # its run ended without the worker's answer
            nonlocal failed
            failed += 1
            run = w.run
            progress.line(run["name"], status, f"{why}; rerun resumes; log: {run['dir'] / 'sweep_job.log'}",
                          time.perf_counter() - w.t0)
            w.run = None

        try:
            while self.workers:
                if guard.received:
                    raise SweepInterrupted(guard.received)
                try:
                    w, msg = self.events.get(timeout=0.2)
                except queue.Empty:
                    w = msg = None
                if w is not None and msg is None:  # its status pipe closed: the worker has exited
                    rc = w.proc.wait()
                    if self.workers.get(w.slot) is w:
                        del self.workers[w.slot]
                    if guard.received:
                        continue
                    if w.run is not None:
                        by_signal = rc < 0 or rc >= 128
                        lost(w, "interrupted" if by_signal else "failed", f"its worker exited with {_rc_text(rc)}")
                        if todo and w.started:
                            self._start(w.slot)  # the crash cost that run only
                    elif not w.closed and (not w.started or rc != 0):
                        time.sleep(0.2)  # let the drain thread read its last words
                        print(f"prompttune sweep: worker {w.slot} exited with {_rc_text(rc)} "
                              f"{'before its first run' if not w.started else 'between runs'}; its output ended:\n"
                              + "".join(w.output), file=sys.stderr, flush=True)
                elif msg is not None and msg.get("ready"):
                    w.ready = w.started = True
                elif msg is not None and "interrupted" in msg:  # signalled on its own (not through us)
                    if w.run is not None and not guard.received:
                        lost(w, "interrupted", f"its worker was stopped by {_signame(int(msg['interrupted']))}")
                elif msg is not None and "status" in msg:
                    name, status, detail, secs = msg["run"], msg["status"], msg["detail"], msg["secs"]
                    run, w.run, w.ready = w.run, None, True
                    if status == "completed":
                        progress.line(name, "completed", detail, secs)
                    elif status in ("skipped", "busy"):
                        progress.line(name, status, detail)
                    else:
                        failed += 1
                        progress.line(name, "failed", f"{detail}; log: {run['dir'] / 'sweep_job.log'}", secs)
                for w in list(self.workers.values()):  # hand out work to the free workers
                    if w.ready and not w.closed:
                        run = _next_run(todo, progress, self.retry_failed)
                        if run is None:
                            w.close()
                        elif not w.send(run):
                            todo.insert(0, run)
            while (run := _next_run(todo, progress, self.retry_failed)) is not None:
                failed += 1  # every worker died before its first run: this one never started
                progress.line(run["name"], "failed", "not run: no worker left (see above)")
        except SweepInterrupted as stop:
            _stop_workers(list(self.workers.values()), stop.signum)
            raise
        return failed


def _stop_workers(workers: list[_Worker], signum: int, grace_s: float = 120.0) -> None:
    """Pass the signal on to every worker (each checkpoints its run and exits), then wait; kill stragglers."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signum)
    deadline = time.time() + grace_s
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


def _rc_text(rc: int) -> str:
    if rc < 0:
        return f"signal {signal.Signals(-rc).name}"
    if rc > 128 and rc - 128 in {s.value for s in signal.Signals}:
        return f"rc {rc} (signal {signal.Signals(rc - 128).name})"
    return f"rc {rc}"


# --------------------------------------------------------------------------- --jobs N: a worker
@contextlib.contextmanager
def _output_to(log_file: Path):
    """Send this process's stdout and stderr (the file descriptors: Lightning, warnings, C code) to ``log_file``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in saved:
                os.close(f)


def worker_main(argv: list[str] | None = None) -> int:
    """A ``--jobs`` worker: import what training needs, then read its setup line (the plan file and
    its GPUs) and train the runs named on stdin, one by one, until stdin ends."""
    ap = argparse.ArgumentParser(prog="python -m prompttune.launchers",
                                 description="a `prompttune sweep --jobs N` worker (started by the sweep itself)")
    ap.add_argument("--status-fd", type=int, required=True, help="pipe for the JSON status lines")
    ap.add_argument("--slot", type=int, default=0, help="which of the --jobs workers this is (for its logs)")
    ap.add_argument("--retry-failed", action="store_true")
    args = ap.parse_args(argv)
    status = os.fdopen(args.status_fd, "w", buffering=1)

    def say(**msg: Any) -> None:
        status.write(json.dumps(msg) + "\n")

    current = None
    with _SignalGuard() as guard:
        try:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            from prompttune.registry import load_all
            from prompttune.runs import quiet_lightning

            quiet_lightning()  # imports Lightning (and torch): the start-up this worker pays once
            load_all()
            line = sys.stdin.buffer.readline()  # {"plan": file, "env": {...}}; nothing: the sweep stopped early
            if not line:
                return 0
            setup = json.loads(line)
            os.environ.update(setup["env"])  # CUDA_VISIBLE_DEVICES: read when CUDA starts, not at import
            with open(setup["plan"], "rb") as fh:
                runs = {r["name"]: r for r in pickle.load(fh)}
            say(ready=True)
            while True:
                line = sys.stdin.buffer.readline()
                if not line:
                    return 0
                current = line.decode().strip()
                run = runs[current]
                run["dir"].mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                with _output_to(run["dir"] / "sweep_job.log"):
                    print(f"sweep worker {args.slot} (pid {os.getpid()}): {current}", flush=True)
                    result, detail = run_one(run, guard, args.retry_failed)
                    secs = time.perf_counter() - t0
                    print(f"{current}: {result} ({secs:.1f} s)  {detail}", flush=True)
                guard.restore_sigint()
                say(run=current, status=result, detail=detail, secs=secs)
                current = None
        except (SweepInterrupted, KeyboardInterrupt) as stop:
            signum = int(getattr(stop, "signum", None) or signal.SIGINT)
            say(interrupted=signum, run=current)
            return 128 + signum


# --------------------------------------------------------------------------- SLURM (submitit)
class SweepTask:
    """One task of a SLURM job array: claim and train runs of the sweep until none is left.
    Checkpointable: on preemption or time-out submitit requeues it, and the requeued task resumes
    the interrupted run from its ``last.ckpt`` (its claim died with the old task)."""

    def __init__(self, path: str, extra: list[str], runs_dir: str, retry_failed: bool, wandb: bool,
                 seeds: int | None = None):
        self.path, self.extra, self.runs_dir = path, list(extra), runs_dir
        self.retry_failed, self.wandb, self.seeds = retry_failed, wandb, seeds

    def __call__(self, task_index: int) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from prompttune.runs import quiet_lightning

        quiet_lightning()
        _, runs = plan(self.path, self.extra, runs_dir=self.runs_dir, seeds=self.seeds, wandb=self.wandb)
        done: dict[str, str] = {}
        with _SignalGuard(raise_now=False) as guard:  # submitit's own USR2 handler requeues
            for r in runs:
                status, detail = run_one(r, guard, self.retry_failed)
                done[r["name"]] = status
                print(f"task {task_index}: {r['name']}: {status}  {detail}", flush=True)
        return done

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def slurm_parameters(opts: dict) -> dict[str, Any]:
    """submitit AutoExecutor parameters from the CLI's --partition, --gpus-per-task, ... options."""
    p: dict[str, Any] = {"name": opts.get("name") or "prompttune-sweep", "timeout_min": int(opts.get("time") or 60),
                         "tasks_per_node": 1, "nodes": 1, "slurm_signal_delay_s": 120}
    if opts.get("gpus_per_task") is not None:
        p["gpus_per_node"] = int(opts["gpus_per_task"])
    if opts.get("cpus_per_task") is not None:
        p["cpus_per_task"] = int(opts["cpus_per_task"])
    if opts.get("mem_gb") is not None:
        p["mem_gb"] = float(opts["mem_gb"])
    if opts.get("partition"):
        p["slurm_partition"] = opts["partition"]
    if opts.get("account"):
        p["slurm_account"] = opts["account"]
    if opts.get("array_parallelism"):
        p["slurm_array_parallelism"] = int(opts["array_parallelism"])
    if opts.get("setup"):
        p["slurm_setup"] = list(opts["setup"])
    return p


def sbatch_script(slurm_dir: str | Path, tasks: int, opts: dict) -> str:
    """The sbatch script submitit writes for ``tasks`` array tasks, made here without SLURM (for
    ``--dry-run`` and tests): the AutoExecutor parameters mapped to sbatch's names as submitit maps them."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    equiv = SlurmExecutor._equivalence_dict()
    params: dict[str, Any] = {}
    for k, v in slurm_parameters(opts).items():
        if k.startswith("slurm_"):
            params[k.removeprefix("slurm_")] = v
        elif k == "mem_gb":
            params["mem"] = f"{int(v)}GB" if float(v).is_integer() else f"{int(v * 1024)}MB"
        else:
            name = equiv.get(k, k)
            params[name[0] if isinstance(name, tuple) else name] = v
    folder = Path(slurm_dir) / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=tasks, **params)


def submit_slurm(path: str | Path, extra: list[str], opts: dict, runs_dir: str | Path | None = None,
                 retry_failed: bool = False, wandb: bool = False, cluster: str | None = "slurm",
                 dry_run: bool = False, seeds: int | None = None) -> list:
    """``--launcher slurm``: a SLURM job array through submitit; every task claims runs until none
    is left (so tasks = --array-parallelism, default: one per run still to do)."""
    block, runs = plan(path, extra, runs_dir=runs_dir, seeds=seeds, wandb=wandb)  # validate every point first
    rdir = Path(block["runs_dir"]).resolve()
    states = {r["name"]: run_state(r["dir"], r["cfg"]) for r in runs}
    check_not_stale(runs, states)
    todo = [r for r in runs if states[r["name"]] != "completed"
            and (retry_failed or states[r["name"]] != "failed")]
    if not todo:
        print(f"nothing to do: all {len(runs)} runs of {block['name']} are completed (or failed; --retry-failed)")
        return []
    tasks = min(len(todo), int(opts.get("array_parallelism") or len(todo)))
    slurm_dir = Path(opts.get("slurm_dir") or rdir / "slurm")
    if dry_run:
        print(sbatch_script(slurm_dir, tasks, opts))
        return []
    import submitit

    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rdir / "sweep.json", {"name": block["name"], "source": str(block["_path"]),
                                            "report": block["report"], "runs": [r["name"] for r in runs]})
    ex = submitit.AutoExecutor(folder=str(slurm_dir / "%j"), cluster=cluster)
    params = slurm_parameters({**opts, "name": opts.get("name") or f"sweep-{block['name']}"})
    if cluster == "local":  # the local executor knows no slurm_* keys
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    ex.update_parameters(**params)
    task = SweepTask(str(Path(block["_path"]).resolve()), list(extra), str(rdir), retry_failed, wandb, seeds)
    jobs = ex.map_array(task, list(range(tasks)))
    print(f"submitted {len(jobs)} task(s) for {len(todo)} run(s): job {jobs[0].job_id.split('_')[0]}; logs in "
          f"{slurm_dir}; `prompttune sweep {shlex.quote(str(path))}{f' --seeds {seeds}' if seeds else ''} --dry-run` "
          "shows progress")
    return jobs



if __name__ == "__main__":  # a --jobs worker, started by run_parallel
    raise SystemExit(worker_main())
