"""W&B: one run per prompttune run (decoded from the offline run files), finished and marked
failed on failure; never hangs a run; never records keys; masks only real secret names."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- offline run files
def wandb_records(path: Path):
    """Records of a ``run-*.wandb`` file: a 7-byte file header (":W&B", magic 0xBEE1, version),
    then LevelDB-log records in 32 KiB blocks, each chunk = crc32 (4) + length (2, LE) + type (1:
    full, 2: first, 3: middle, 4: last), holding ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def decode_run(run_dir: Path) -> dict:
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out = {"summary": {}, "history": [], "config": {}, "exit_code": None}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, group=rec.run.run_group, job_type=rec.run.job_type, tags=list(rec.run.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.summary.update})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out




def test_four_run_sweep_makes_four_finished_wandb_runs(tmp_path, monkeypatch, tiny_sweep):
    from prompttune.sweep import run_sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run_sweep(tiny_sweep("wb", cpu_threads=1), wandb=True, report=False) == 0
    runs = {d.name: d for d in (tmp_path / "runs").iterdir() if d.is_dir()}
    assert set(runs) == {"method=zero_shot,s0", "method=zero_shot,s1", "method=linear_probe,s0",
                         "method=linear_probe,s1"}
    decoded = {name: decode_run(d) for name, d in runs.items()}
    assert len({r["id"] for r in decoded.values()}) == 4  # 4 distinct W&B runs, not one reused
    for name, r in decoded.items():
        method = name.split(",")[0].split("=")[1]
        rec = json.loads((runs[name] / "result.json").read_text())
        assert r["group"] == f"wb/method={method}"  # seeds of one point share a group
        assert r["job_type"] == method
        assert f"method={method}" in r["tags"] and "sweep=wb" in r["tags"]
        assert r["config"]["method"]["name"] == method and r["config"]["seed"] == rec["seed"]
        assert r["config"]["wandb"]["group"] == r["group"]
        assert any("test/acc" in h for h in r["history"])  # this run's own history
        assert r["summary"]["test/acc"] == pytest.approx(rec["metrics"]["test/acc"])
        for k in ("trainable_params", "total_params", "train_time_s", "samples_per_s", "peak_mem_mb"):
            assert r["summary"][k] == pytest.approx(rec[k]), k
        assert r["summary"]["status"] == "completed" and r["exit_code"] == 0
    # each history holds one test/acc: the runs' histories were not poured into one W&B run
    assert all(sum("test/acc" in h for h in r["history"]) == 1 for r in decoded.values())


def test_failed_run_is_finished_as_failed(tmp_path, monkeypatch):
    import lightning as L

    from prompttune.config import compose
    from prompttune.runs import fit

    monkeypatch.setenv("WANDB_MODE", "offline")

    def boom(*a, **k):
        raise RuntimeError("test split exploded")

    monkeypatch.setattr(L.Trainer, "test", boom)
    cfg = compose(REPO / "experiments/smoke.yaml", ["method=linear_probe", "wandb.enabled=true",
                                                     f"run_dir={tmp_path / 'r'}", "trainer.cpu_threads=1"])
    with pytest.raises(RuntimeError, match="exploded"):
        fit(cfg)
    r = decode_run(tmp_path / "r")
    assert r["exit_code"] == 1 and r["summary"]["status"] == "failed"
    assert "exploded" in r["summary"]["error"]
    import wandb

    assert wandb.run is None  # finished: the next run in this process gets its own W&B run


def test_scrub_masks_exact_secret_names_only():
    from prompttune.wandb_utils import scrub

    cfg = {"method": {"class_token_position": "end", "token_reweight": True, "n_ctx": 4},
           "task": {"max_new_tokens": 20}, "backbone": {"qformer_tokenizer": "bert", "key": "k"},
           "hub": {"token": "hf_x", "API_KEY": "abc", "password": "p", "secret": "s", "empty_token": None},
           "list": [{"token": "t"}]}
    out = scrub(cfg)
    assert out["method"] == cfg["method"] and out["task"] == cfg["task"] and out["backbone"] == cfg["backbone"]
    assert out["hub"] == {"token": "***", "API_KEY": "***", "password": "***", "secret": "***", "empty_token": None}
    assert out["list"] == [{"token": "***"}]


def test_group_job_type_tags_are_config_keys(tmp_path):
    from prompttune.config import compose
    from prompttune.wandb_utils import run_tags

    cfg = compose(REPO / "experiments/smoke.yaml", ["method=coop", "wandb.group=g1", "wandb.job_type=ablation",
                                                     "wandb.tags=[a, " + "x" * 80 + ", a]"])
    assert cfg.wandb.group == "g1" and cfg.wandb.job_type == "ablation"
    assert run_tags(cfg) == ["a", "x" * 64]  # W&B's 64-character limit; duplicates dropped


# --------------------------------------------------------------------------- never hangs, never leaks a key
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
