"""The demo's scheduler (prompttune/demo.py: zoo builds and sections as child processes, at most
``jobs`` at once, a section after the zoo entries it needs) on toy commands; and zoo_needs."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prompttune import demo

PY = sys.executable


def _task(tmp: Path, key: str, body: str, needs=()) -> demo._Task:
    """A child that appends (key, start, end, OMP_NUM_THREADS) to a shared JSON-lines file."""
    code = textwrap.dedent(f"""
        import json, os, sys, time
        t0 = time.time()
        {body}
        with open({str(tmp / 'trace.jsonl')!r}, 'a') as fh:
            fh.write(json.dumps([{key!r}, t0, time.time(), os.environ.get('OMP_NUM_THREADS')]) + '\\n')
    """)
    return demo._Task(key, [PY, "-c", code], tmp / "logs" / f"{key.replace(':', '-')}.log", tuple(needs))


def _trace(tmp: Path) -> dict:
    return {k: (a, b, t) for k, a, b, t in map(json.loads, (tmp / "trace.jsonl").read_text().splitlines())}


def test_sections_wait_for_their_zoo_builds_and_at_most_jobs_run_at_once(tmp_path, capsys):
    tasks = [_task(tmp_path, "zoo:a", "time.sleep(1.0); print('zoo: built a')"),
             _task(tmp_path, "s1", "print('[1/1] run completed')", needs=["zoo:a"]),
             _task(tmp_path, "s2", "time.sleep(0.5)"),
             _task(tmp_path, "s3", "time.sleep(0.5)")]
    assert demo._Scheduler(tasks, jobs=2).run() == 0
    tr = _trace(tmp_path)
    assert set(tr) == {"zoo:a", "s1", "s2", "s3"}
    assert tr["s1"][0] >= tr["zoo:a"][1]  # started after the build it needs had finished
    assert {t[2] for t in tr.values()} == {"1"}  # one intra-op thread per child
    events = sorted([(a, 1) for a, _, _ in tr.values()] + [(b, -1) for _, b, _ in tr.values()])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    assert peak <= 2
    out = capsys.readouterr().out
    assert "[zoo:a] zoo: built a" in out and "[s1] [1/1] run completed" in out  # progress echoed
    assert all(t.rc == 0 for t in tasks)


def test_a_failed_build_skips_the_sections_that_need_it_but_not_the_others(tmp_path, capsys):
    tasks = [_task(tmp_path, "zoo:bad", "sys.exit(3)"),
             _task(tmp_path, "needs_bad", "pass", needs=["zoo:bad"]),
             _task(tmp_path, "free", "pass")]
    assert demo._Scheduler(tasks, jobs=1).run() == 0
    by = {t.key: t.rc for t in tasks}
    assert by == {"zoo:bad": 3, "needs_bad": 1, "free": 0}
    assert "needs_bad" not in _trace(tmp_path) and "free" in _trace(tmp_path)
    out = capsys.readouterr().out
    assert "zoo:bad: FAILED (exit code 3" in out and "needs_bad: not run, it needs zoo:bad" in out


@pytest.mark.parametrize("forked", [False, True])
def test_sigterm_reaches_the_children_and_the_demo_exits_143(tmp_path, forked):
    """The same child body as a fresh interpreter (``cmd``) and as a forked call (``fn``)."""
    body = (f"signal.signal(signal.SIGTERM, lambda *a: (open({str(tmp_path / 'child_got')!r}, 'w').write('TERM'), "
            "sys.exit(143)))\nprint('[1/1] started', flush=True)\ntime.sleep(60)\n")
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        from prompttune import demo
        body = {body!r}
        def fn():
            exec(body)
        cmd = [sys.executable, "-c", "import signal, sys, time\\n" + body]
        t = demo._Task("s", cmd, Path({str(tmp_path / 'logs' / 's.log')!r}), fn=fn if {forked} else None)
        rc = demo._Scheduler([t], jobs=1).run()
        print("child rc", t.proc.returncode, flush=True)
        sys.exit(rc)
    """))
    p = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    log = tmp_path / "logs" / "s.log"
    while time.time() < deadline and not (log.is_file() and "started" in log.read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143, out
    assert "child rc 143" in out
    assert (tmp_path / "child_got").read_text() == "TERM"


def test_zoo_needs_reads_backbones_and_named_backbone_configs_but_not_random_weights():
    from omegaconf import OmegaConf

    def runs(*cfgs):
        return [{"cfg": OmegaConf.create(c)} for c in cfgs]

    assert demo.zoo_needs(runs({"backbone": {"zoo_entry": "clip-tiny"}, "method": {"uses": {"backbone": "zoo_vit_mae"}}})) \
        == ["clip-tiny"]  # a method's default backbone (`uses`) is not what the run loads
    assert demo.zoo_needs(runs({"backbone": {"zoo_entry": "clip-tiny"},
                                "method": {"tse_backbone": "zoo_clip_s2"}})) == ["clip-tiny", "clip-tiny-s2"]
    assert demo.zoo_needs(runs({"backbone": {"zoo_entry": "clip-tiny", "weights": "random"}})) == []


def test_a_child_killed_by_a_signal_fails_the_demo():
    """A section that died of SIGKILL (e.g. the OOM killer; Popen's returncode -9) is a failure,
    reported as the shell would (137), not hidden by the successes beside it."""
    def task(rc):
        t = demo._Task("s", [], Path("x.log"))
        t.rc = rc
        return t

    assert demo.exit_status([task(0), task(0)]) == 0
    assert demo.exit_status([task(0), task(-9)]) == 137
    assert demo.exit_status([task(1), task(3), task(None)]) == 3


def _fork_fn(tmp: Path, key: str, rc: int = 0, sleep: float = 0.0):
    """A forked task body: prints a progress line and a bar, records its thread settings, returns rc."""
    def fn():
        import os

        import torch
        time.sleep(sleep)
        print(f"[1/1] {key} completed", flush=True)
        with open(tmp / f"{key}.json", "w") as fh:
            json.dump({"omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(),
                       "pid": os.getpid()}, fh)
        if rc == 99:
            raise RuntimeError("boom in the child")
        return rc
    return fn


def test_forked_tasks_log_return_their_codes_and_run_one_thread_each(tmp_path, capsys):
    import os

    tasks = [demo._Task("zoo:a", ["false"], tmp_path / "logs" / "a.log", fn=_fork_fn(tmp_path, "a", sleep=0.3)),
             demo._Task("s1", ["false"], tmp_path / "logs" / "s1.log", ("zoo:a",), fn=_fork_fn(tmp_path, "s1", rc=4)),
             demo._Task("s2", ["false"], tmp_path / "logs" / "s2.log", fn=_fork_fn(tmp_path, "s2", rc=99))]
    assert demo.can_fork()
    assert demo._Scheduler(tasks, jobs=2).run() == 0
    assert {t.key: t.rc for t in tasks} == {"zoo:a": 0, "s1": 4, "s2": 1}  # fn's code, not cmd's ("false": 1)
    for key in ("a", "s1", "s2"):
        info = json.loads((tmp_path / f"{key}.json").read_text())
        assert info["omp"] == "1" and info["threads"] == 1 and info["pid"] != os.getpid()
    assert "[1/1] s1 completed" in (tmp_path / "logs" / "s1.log").read_text()
    assert "RuntimeError: boom in the child" in (tmp_path / "logs" / "s2.log").read_text()  # traceback in its log
    out = capsys.readouterr().out
    assert "[s1] [1/1] s1 completed" in out and "s1: FAILED (exit code 4" in out
    assert demo.exit_status(tasks) == 4



def test_an_entry_built_from_another_waits_for_it():
    """vit-clip-tiny is converted from clip-tiny: the demo builds clip-tiny first, and the
    conversion's task waits for it (a slot is never spent waiting on clip-tiny's lock)."""
    plan = demo.zoo_sources(["vit-mae-tiny", "vit-clip-tiny", "clip-tiny"])
    assert plan == {"vit-mae-tiny": (), "clip-tiny": (), "vit-clip-tiny": ("clip-tiny",)}
    assert list(plan).index("clip-tiny") < list(plan).index("vit-clip-tiny")
    assert demo.zoo_sources(["vit-clip-tiny"]) == {"clip-tiny": (), "vit-clip-tiny": ("clip-tiny",)}
