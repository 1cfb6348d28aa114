"""`prompttune bench`: rows, the plain loop's equivalence to the framework step, --json, bad input.

No timed assertions: timings on a shared CPU are noise; what is asserted is that the
measurement measures the right computation.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from prompttune import bench
from prompttune import runs as bench_runs
from prompttune.config import ConfigError
from prompttune.runs import build, make_module

FAST = ["bench.memory=false", "bench.warmup=1", "bench.cache_epochs=2", "bench.cache_batches=2"]


def _opts(extra=()):
    opts, rest = bench.split_options([*FAST, *extra])
    return opts, rest


@pytest.mark.parametrize("method", ["linear_probe", "vpt"])
def test_rows_have_required_keys_and_sane_values(method):
    opts, rest = _opts()
    row = bench.bench_method(method, rest, steps=2, opts=opts)
    for key in bench.REQUIRED_KEYS:
        assert key in row, f"row lacks {key!r}"
    assert row["method"] == method
    assert row["steps"] == 2  # warm-up steps are excluded, every other step timed
    assert row["stage"] == "train"
    for key in ("fw_step_ms", "plain_step_ms", "fwd_ms", "samples_per_s", "overhead_ratio", "limit_ratio"):
        assert row[key] > 0, key
    assert row["overhead_ratio"] == pytest.approx(row["overhead_ratio"])  # finite
    assert row["gflops_per_step"] > 0
    if method == "linear_probe":  # reads frozen features: the cache measurement is made
        assert row["epoch1_s"] > 0 and row["epoch2plus_s"] > 0 and row["cache_speedup"] > 0
    else:
        assert "cache_speedup" not in row
        assert 1.5 < row["flop_ratio"] < 2.4  # input-level prompts: no frozen-weight gradients
    table = bench.format_table([row])
    assert method in table and "overhead" in table


def _built(method, overrides=()):
    cfg = bench.compose_for(method, list(overrides))
    backbone, dm, m, task = build(cfg)
    module = make_module(cfg, backbone, m, task)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return cfg, backbone, dm, m, task, module, batch


@pytest.mark.parametrize("method", ["linear_probe", "vpt"])
def test_plain_loop_does_the_framework_step(method):
    """Same loss on the same batch, and after one step of each, the same parameters."""
    cfg, backbone, dm, method_, task, module, batch = _built(method)
    plain_method = copy.deepcopy(method_)
    plain = bench.PlainLoop(backbone, plain_method, copy.deepcopy(task), cfg.method.optim, 1,
                            torch.device("cpu"), cache=module.cache_features)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")  # self.log without a trainer
        fw_loss = module.training_step(batch, 0)
    assert torch.allclose(fw_loss.detach(), plain.loss(batch).detach(), atol=1e-6)

    module.optim_cfg["epochs"] = 1
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        trainer = bench._trainer(cfg, Path(tmp), 1, [])
        trainer.fit(module, train_dataloaders=bench.Batches([batch]))
    before = {n: p.detach().clone() for n, p in plain_method.named_parameters()}
    plain.step(batch, 0)
    changed = False
    for (name, p_fw), (_, p_pl) in zip(method_.named_parameters(), plain_method.named_parameters()):
        assert torch.allclose(p_fw, p_pl, atol=1e-6), f"{name} differs after one step"
        changed |= not torch.equal(p_pl.detach(), before[name])
    assert changed, "the plain step changed no parameter"
    assert all(p.grad is None for p in backbone.parameters()), "the frozen backbone got gradients"


def test_full_finetuning_trains_the_backbone_too():
    cfg, backbone, dm, method, task, module, batch = _built("vpt")
    n_backbone = sum(p.numel() for p in backbone.parameters())
    plain = bench.PlainLoop(backbone, method, task, cfg.method.optim, 1, torch.device("cpu"), full_ft=True)
    w = next(p for p in backbone.parameters() if p.dim() == 2)
    w0 = w.detach().clone()
    plain.step(batch, 0)
    assert w.grad is not None and not torch.equal(w.detach(), w0), "full fine-tuning left the backbone unchanged"
    n_opt = sum(p.numel() for g in plain.opt.param_groups for p in g["params"])
    assert n_opt == n_backbone + sum(p.numel() for p in method.parameters())


def test_measure_memory_reports_prompt_and_full_ft():
    prompt = bench.measure_memory("vpt", [], full_ft=False, steps=1)
    full = bench.measure_memory("vpt", [], full_ft=True, steps=1)
    assert prompt["peak_mem_mb"] > 0 and prompt["train_mem_mb"] >= 0
    assert full["trainable_params"] > prompt["trainable_params"] > 0


def test_rss_sampler_sees_a_transient_allocation():
    with bench.RSSSampler() as s:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed inside the block
        del x
    assert s.peak - s.base > 40, (s.base, s.peak)


def test_json_written_by_the_cli(tmp_path, capsys):
    from prompttune.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "zero_shot", *FAST, "--steps", "2", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    for key in bench.REQUIRED_KEYS:
        assert key in row
    assert row["method"] == "zero_shot" and row["stage"] == "test"  # nothing to train: the eval step
    assert "zero_shot" in capsys.readouterr().out  # the table on stdout


@pytest.mark.parametrize("bad, needle", [
    ("bench.nope=1", "unknown bench option 'bench.nope=1'"),
    ("bench.warmup=x", "bench.warmup must be a number"),
    ("bench.compile=maybe", "bench.compile must be true or false"),
    ("bench.clock=sundial", "bench.clock must be auto, cpu or wall"),
    ("bench.cache_epochs=1", "bench.cache_epochs must be >= 2"),
])
def test_bad_bench_options_rejected(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        bench.split_options([bad])


def test_unknown_method_and_bad_key_rejected_before_compute(capsys):
    from prompttune.cli import main

    assert main(["bench", "no_such_method"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'no_such_method'" in err and "vpt" in err
    assert main(["bench", "vpt", "method.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["bench", "vpt", "--steps", "0"]) == 2


def test_flop_count_and_mfu_helpers():
    cfg, backbone, dm, method, task, module, batch = _built("vpt")
    plain = bench.PlainLoop(backbone, method, task, cfg.method.optim, 1, torch.device("cpu"))
    flops = bench.count_step_flops(plain, batch)
    fwd_counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with fwd_counter:
        plain.loss(batch)  # forward only (no backward); with grad on, as the counter's module hooks need
    fwd = fwd_counter.get_total_flops()
    # forward + backward to the prompts: ~2x a forward; frozen weights' grads would make it ~3x
    assert 1.5 * fwd < flops < 2.4 * fwd  # 3x would mean weight gradients
    assert bench.device_peak_tflops(torch.device("cpu"), None) is None
    assert bench.device_peak_tflops(torch.device("cpu"), 100.0) == 100.0
    assert bench.format_table([{"method": "m", "mfu": None}]).count("-") > 3


def test_scaling_curve_rows_and_plot(tmp_path):
    """A small retrieval curve: rows per point, linear growth in the gallery, quadratic in N, and a PNG."""
    rows = bench.curve_retrieval(gallery=(500, 4000), queries=200, dim=64, full=(300, 2400))
    gal = [r for r in rows if r["curve"] == "retrieval_gallery"]
    full = [r for r in rows if r["curve"] == "retrieval_full"]
    assert [r["x"] for r in gal] == [500, 4000] and [r["x"] for r in full] == [300, 2400]
    assert all(r["eval_ms"] > 0 for r in rows)
    # 8x the items: the full (quadratic) evaluation grows by far more than the fixed-query one
    assert full[1]["eval_ms"] / full[0]["eval_ms"] > gal[1]["eval_ms"] / gal[0]["eval_ms"]
    bench.plot_curve(rows, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_sweep_cli_rejects_unknown_curves(capsys):
    from prompttune.cli import main

    assert main(["bench", "--sweep", "no_such_curve"]) == 2
    err = capsys.readouterr().err
    assert "no_such_curve" in err and "coop_classes" in err
    assert main(["bench"]) == 2  # neither a method nor --sweep


def test_canvas_and_blip2_curves_at_toy_size():
    """The MAE-VQGAN batch curve and the BLIP-2 k curve, on the tiny zoo architectures (random
    weights): one row per point, the batch the step saw, the backbone built once and reused, and
    the LM sequence growing with each demonstration."""
    built = []
    real_build_backbone = bench_runs.build_backbone

    def counting(cfg):
        built.append(cfg.backbone.name)
        return real_build_backbone(cfg)

    with mock.patch.object(bench_runs, "build_backbone", counting):
        canvas = bench.curve_icl_canvas_batch("e_inmemo", (1, 2), overrides=["backbone=zoo_mae_vqgan"])
        blip = bench.curve_blip2_k((0, 2), batch=2, overrides=["backbone=zoo_blip2"])
    assert built == ["mae_vqgan", "blip2"]  # one backbone per curve, not per point
    assert [(r["x"], r["batch_size"]) for r in canvas] == [(1, 1), (2, 2)]
    assert canvas[0]["canvas_px"] == 64 and canvas[0]["tokens"] == 64  # tiny: 64 px, patch 8
    assert all(r["step_ms"] > 0 and r["fwd_ms"] > 0 and r["trainable_params"] > 0 for r in canvas)
    assert [r["x"] for r in blip] == [0, 2] and [r["images_per_step"] for r in blip] == [2, 6]
    assert all("fwd_ms" not in r and r["step_ms"] > 0 for r in blip)
    # two demonstrations add their hub text features and an end-of-chunk token each to the LM prefix
    assert blip[1]["lm_prefix_len"] >= blip[0]["lm_prefix_len"] + 4
    with pytest.raises(bench.BenchError, match="changes the backbone config"):
        bench.curve_method_steps("e_inmemo", "backbone.canvas_pad", (1, 2), ["backbone=zoo_mae_vqgan"],
                                 steps=1, reuse_backbone=True, forward=False)
