"""End to end: every registered method's smoke run, sweeps, reports, and run records."""

import json
from pathlib import Path

import pytest

from prompttune.config import compose
from prompttune.registry import METHODS
from prompttune.runs import fit

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments/smoke.yaml"
REQUIRED = {"status", "method", "backbone", "data", "seed", "metrics", "trainable_params", "total_params",
            "train_time_s", "samples_per_s", "peak_mem_mb"}


@pytest.mark.parametrize("method", METHODS.names())
def test_smoke_every_registered_method(method, tmp_path):
    cfg = compose(SMOKE, [f"method={method}", f"run_dir={tmp_path / method}"])
    result = fit(cfg)
    assert REQUIRED <= set(result), REQUIRED - set(result)
    on_disk = json.loads((tmp_path / method / "result.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["method"] == method
    assert on_disk["metrics"] and all(k.startswith("test/") for k in on_disk["metrics"])
    assert (tmp_path / method / "config.yaml").is_file()
    assert (tmp_path / method / "logs" / "metrics.csv").is_file()


def test_checkpoint_is_kilobytes_and_resumable_state(tmp_path):
    import torch

    cfg = compose(SMOKE, ["method=coop", f"run_dir={tmp_path}"])
    res = fit(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.stat().st_size < 64 * 1024, ckpt.stat().st_size
    state = torch.load(ckpt, weights_only=True)
    assert list(state["state_dict"]) == ["method.prompt_learner.ctx"]
    assert cfg.method.ctx_init is None and res["trainable_params"] == cfg.method.n_ctx * 128  # n_ctx vectors of width 128
    # a completed run is not redone
    again = fit(cfg)
    assert again["finished_at"] == res["finished_at"]


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    from prompttune.tasks.classification import ClassificationTask

    calls = []
    real = ClassificationTask.loss

    def flaky(self, outputs, batch):  # the third training step's loss is NaN
        calls.append(1)
        loss = real(self, outputs, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(ClassificationTask, "loss", flaky)
    cfg = compose(SMOKE, ["method=linear_probe", "method.optim.epochs=3", f"run_dir={tmp_path}"])
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at epoch 1, step 2, batch 0"):
        fit(cfg)
    record = json.loads((tmp_path / "result.json").read_text())  # a failed record, never a completed one
    assert record["status"] == "failed" and "non-finite training loss" in record["error"]


def test_evaluate_loads_the_trainable_checkpoint(tmp_path):
    from prompttune.runs import evaluate

    cfg = compose(SMOKE, ["method=linear_probe", f"run_dir={tmp_path}"])
    res = fit(cfg)
    again = evaluate(cfg)
    assert abs(again["test/acc"] - res["metrics"]["test/acc"]) < 1e-6


def test_cli_errors_are_clear_and_before_compute(cli, tmp_path):
    out = cli("fit", SMOKE, "method=nope", f"run_dir={tmp_path / 'a'}")
    assert out.returncode == 2 and "unknown method 'nope'" in out.stderr and "valid choices" in out.stderr
    assert not (tmp_path / "a").exists()
    out = cli("fit", SMOKE, "method=coop", "method.n_ctxx=2", f"run_dir={tmp_path / 'b'}")
    assert out.returncode == 2 and "unknown key 'method.n_ctxx'" in out.stderr
    out = cli("fit", SMOKE, "method=coop", f"data.root={tmp_path / 'missing'}", "data.synthetic=null",
              f"run_dir={tmp_path / 'c'}")
    assert out.returncode == 2 and "dataset folder not found" in out.stderr
    assert not (tmp_path / "c").exists()


def test_feature_cache_changes_nothing_but_decoding(tmp_path, monkeypatch):
    """Cached and uncached runs train to the same weights; the cached one decodes each training
    image once (epoch 1), then trains on cached features without reading pixels."""
    import torch

    import prompttune.data.base as base

    reads = []
    real = base.read_image
    monkeypatch.setattr(base, "read_image", lambda p: (reads.append(p), real(p))[1])
    # the in-run cache alone: the on-disk store (tests/test_features*.py) would serve other tests' features
    common = ["method=linear_probe", "data.shots=2", "method.optim.epochs=3", "trainer.limit_train_batches=null",
              "trainer.limit_test_batches=1", "data.eval_batch_size=8", "features.store=false"]
    fit(compose(SMOKE, [*common, f"run_dir={tmp_path / 'cached'}"]))
    cached_reads = len(reads)
    fit(compose(SMOKE, [*common, "method.cache_features=false", f"run_dir={tmp_path / 'plain'}"]))
    plain_reads = len(reads) - cached_reads
    train = 16 * 2
    assert cached_reads == train + 8 and plain_reads == 3 * train + 8
    a = torch.load(tmp_path / "cached/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "plain/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])
