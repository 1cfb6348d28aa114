"""scripts/gpu_check.sh on the CPU: the missing GPU is detected (exit 2, a clear message), and the
report-building code (agreement, kernel detection, tables, JSON, the BLIP-2/OPT-125m folder) works
on tiny inputs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from prompttune import gpu_check
from prompttune.config import repo_root


def test_script_without_a_gpu_exits_2_with_a_clear_message(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(repo_root() / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == gpu_check.NO_GPU_EXIT == 2, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and "Nothing was measured" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_require_gpu():
    with pytest.raises(SystemExit) as exc:
        gpu_check.require_gpu(lambda: False)
    assert exc.value.code == 2
    gpu_check.require_gpu(lambda: True)  # no exit


def test_agreement_and_kernel_detection():
    a = gpu_check.agreement({"loss": 2.0, "acc": 0.5, "only_fp32": 1.0}, {"loss": 2.01, "acc": 0.5})
    assert set(a) == {"acc", "loss"}
    assert a["loss"]["abs_diff"] == pytest.approx(0.01) and a["loss"]["rel_diff"] == pytest.approx(0.005)
    assert a["acc"]["rel_diff"] == 0.0
    f = gpu_check.sdpa_backend_from_kernels
    assert f(["void pytorch_flash::flash_fwd_kernel<...>"]) == "flash"
    assert f(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]) == "mem-efficient"
    assert f(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]) == "flash"
    assert f(["cudnn::fusion::compute_sdpa_fprop"]) == "cudnn"
    assert f(["ampere_bf16_s16816gemm", "softmax_warp_forward"]) == "math (unfused)"
    assert f([]).startswith("unknown")


def test_report_from_a_real_bench_row(tmp_path):
    """The table and JSON from a real (CPU, tiny) bench row plus the GPU-only parts' shapes."""
    from prompttune import bench

    opts, rest = bench.split_options(["bench.memory=false", "bench.warmup=1", "bench.cache_epochs=2",
                                      "bench.cache_batches=2"])
    row = bench.bench_method("vpt", [*rest, "trainer.cpu_threads=1"], steps=2, opts=opts)
    row.update(loss_rel_diff=1.2e-3, metric_rel_diff=0.0)
    failed = {"method": "mhub", "error": "RuntimeError: CUDA out of memory"}
    report = {"device": "NVIDIA H200", "torch": "2.x", "elapsed_s": 301.0, "methods": [row, failed],
              "attention": {"backend": "flash", "kernels": ["flash_fwd_kernel"], "shape": "8x12x197x64"},
              "compile": {"method": "vpt", "eager_ms": 10.0, "compiled_ms": 8.0, "speedup": 1.25},
              "ddp": {"command": "prompttune fit ...", "rc": 0, "seconds": 20.0, "backend": "nccl",
                      "status": "completed"}, "skipped": ["vpt_deep"]}
    md, js = gpu_check.write_report(tmp_path / "o", report)
    text = md.read_text()
    assert "| method | backbone | batch | step ms |" in text
    vpt_line = next(line for line in text.splitlines() if line.startswith("| vpt |"))
    assert f"{row['fw_step_ms']:.2f}" in vpt_line and "1.20e-03" in vpt_line
    assert "CUDA out of memory" in text and "**flash**" in text and "1.25x" in text and "nccl" in text
    assert "Skipped (time budget): vpt_deep" in text
    back = json.loads(js.read_text())
    assert back["methods"][0]["method"] == "vpt" and back["methods"][0]["fw_step_ms"] == row["fw_step_ms"]


def test_blip2_opt125m_folder_loads_as_a_transformers_config(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    folder = gpu_check.write_blip2_opt125m(tmp_path / "blip2")
    cfg = AutoConfig.from_pretrained(str(folder))
    assert cfg.model_type == "blip-2"
    t = cfg.text_config
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.ffn_dim, t.num_attention_heads) == ("opt", 768, 12,
                                                                                                     3072, 12)
    assert cfg.vision_config.hidden_size == 1408 and cfg.vision_config.num_hidden_layers == 39  # ViT-g/14
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok("a red disc").input_ids and tok.unk_token_id not in tok("a red disc").input_ids[-1:]
    assert t.vocab_size == len(tok)


def test_every_method_entry_composes():
    """Each GPU entry's overrides name existing methods, backbones and keys (checked on the CPU)."""
    from prompttune.bench import compose_for

    for method, overrides, bs in gpu_check.METHODS:
        ov = [o.format(blip2_dir="/tmp/none") for o in overrides] + [f"data.batch_size={bs}"]
        cfg = compose_for(method, ov)
        assert cfg.method.name and cfg.data.batch_size == bs
    assert Path(repo_root() / "scripts" / "gpu_check.sh").stat().st_mode & 0o111
