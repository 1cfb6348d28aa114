"""``scripts/gpu_check.sh`` (``make gpu-check``): one short check of prompttune on one GPU.

Random weights at real sizes (nothing is downloaded): CLIP ViT-B/16 (open_clip
``ViT-B-16-quickgelu``), ViT-B/16 (timm ``vit_base_patch16_224``), MAE-VQGAN ViT-L/16, and
BLIP-2 with an OPT-125m-sized language model (a ``save_pretrained``-style folder written here:
``config.json`` + a word-level tokenizer, built with ``weights: random``). It measures

* **bf16-mixed vs fp32**: loss and metric of one fixed batch through each method's forward, both
  precisions, and their relative difference;
* **step time, samples/s, TFLOP/s, MFU** per method (``prompttune bench`` rows, ``trainer=gpu``),
  and the framework overhead against a plain PyTorch loop on the same batches;
* **the fused attention kernel** that ``scaled_dot_product_attention`` dispatches to (flash,
  memory-efficient or cuDNN), read from the CUDA kernel names of a profiled call;
* ``bench.compile=true`` against eager (one method);
* a 1-GPU ``trainer=ddp`` fit through NCCL (``prompttune fit``, a subprocess);
* **peak memory** of each method against full fine-tuning of the same backbone (bench rows).

It writes ``gpu_check.md`` (one table per part) and ``gpu_check.json`` into ``--out`` (default
``$OUT`` if set, else ``runs/gpu_check``), stops starting new parts once ``--budget-s`` (420 s)
is spent, and exits **2** with a clear message when no CUDA GPU is visible. A part that fails
records its error in the table; the others still run (exit code 1 if any failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("prompttune")

NO_GPU_EXIT = 2
NO_GPU_MESSAGE = ("gpu_check: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
                  "this check needs one GPU. Nothing was measured.")

# (method, overrides, batch size): each a real-size backbone with random weights
METHODS: list[tuple[str, list[str], int]] = [
    ("linear_probe", ["backbone=clip_vit_b16", "backbone.model=ViT-B-16-quickgelu"], 256),
    ("coop", ["backbone=clip_vit_b16", "backbone.model=ViT-B-16-quickgelu"], 32),
    ("vpt", ["backbone=vit_b16_in21k"], 64),
    ("vpt_deep", ["backbone=vit_b16_in21k"], 64),
    ("e_inmemo", ["backbone=mae_vqgan_large", "backbone.mae_checkpoint=null", "backbone.vqgan_checkpoint=null"], 16),
    ("mhub", ["backbone=zoo_blip2", "backbone.zoo_entry=null", "backbone.model={blip2_dir}"], 16),
]
COMPILE_METHOD = "vpt"


# --------------------------------------------------------------------------- pieces testable on the CPU
def require_gpu(is_available: Callable[[], bool] | None = None) -> None:
    """Exit with :data:`NO_GPU_EXIT` and a clear message when no CUDA device is visible."""
    if is_available is None:
        import torch

        is_available = torch.cuda.is_available
    if not is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        raise SystemExit(NO_GPU_EXIT)


def agreement(fp32: dict[str, float], bf16: dict[str, float]) -> dict[str, Any]:
    """Per key of both: the two values, their absolute and relative difference."""
    out = {}
    for k in sorted(set(fp32) & set(bf16)):
        a, b = float(fp32[k]), float(bf16[k])
        out[k] = {"fp32": a, "bf16": b, "abs_diff": abs(a - b), "rel_diff": abs(a - b) / max(abs(a), 1e-12)}
    return out


def sdpa_backend_from_kernels(names: list[str]) -> str:
    """Which fused SDPA implementation ran, from the CUDA kernel names of a profiled call."""
    low = " ".join(names).lower()
    if "flash" in low:
        return "flash"
    if "cudnn" in low or "cudnn_sdpa" in low:
        return "cudnn"
    if "fmha" in low or "efficient" in low or "cutlass" in low and "attention" in low:
        return "mem-efficient"
    return "math (unfused)" if names else "unknown (no kernels recorded)"


def _fmt(v: Any, fmt: str) -> str:
    if v is None or v == "":
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def method_table(rows: list[dict[str, Any]]) -> str:
    cols = [("method", "method", "{}"), ("backbone", "backbone", "{}"), ("batch_size", "batch", "{}"),
            ("fw_step_ms", "step ms", "{:.2f}"), ("plain_step_ms", "plain ms", "{:.2f}"),
            ("overhead_ratio", "overhead", "{:.3f}"), ("samples_per_s", "samples/s", "{:.1f}"),
            ("tflops", "TFLOP/s", "{:.2f}"), ("mfu", "MFU", "{:.1%}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
            ("full_ft_peak_mem_mb", "full-FT peak MB", "{:.0f}"), ("loss_rel_diff", "bf16 loss rel. diff", "{:.2e}"),
            ("metric_rel_diff", "bf16 metric rel. diff", "{:.2e}"), ("error", "error", "{}")]
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_report(out: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """``gpu_check.json`` (everything) and ``gpu_check.md`` (the tables) in ``out``."""
    from prompttune.utils import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# GPU check: {report.get('device', '?')}", "",
             f"torch {report.get('torch', '?')}, {report.get('elapsed_s', 0):.0f} s, random weights at real sizes "
             "(`scripts/gpu_check.sh`).", "", "## Methods (trainer=gpu, bf16-mixed)", "",
             method_table(report.get("methods", [])), ""]
    att = report.get("attention") or {}
    lines += ["## Fused attention", "", f"SDPA backend used: **{att.get('backend', '-')}** "
              f"(bf16, {att.get('shape', '-')}); kernels: {', '.join(att.get('kernels', [])[:4]) or '-'}", ""]
    comp = report.get("compile") or {}
    if comp:
        lines += ["## torch.compile", "", f"{comp.get('method')}: eager {_fmt(comp.get('eager_ms'), '{:.2f}')} ms, "
                  f"compiled {_fmt(comp.get('compiled_ms'), '{:.2f}')} ms a step "
                  f"(speed-up {_fmt(comp.get('speedup'), '{:.2f}')}x){' — ' + comp['error'] if comp.get('error') else ''}", ""]
    ddp = report.get("ddp") or {}
    if ddp:
        lines += ["## 1-GPU DDP (NCCL)", "", f"`{ddp.get('command', '')}`: exit {ddp.get('rc')}, "
                  f"{_fmt(ddp.get('seconds'), '{:.1f}')} s, backend {ddp.get('backend', '-')}, "
                  f"status {ddp.get('status', '-')}", ""]
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["Skipped (time budget): " + ", ".join(skipped), ""]
    md, js = out / "gpu_check.md", out / "gpu_check.json"
    atomic_write_json(js, report)
    atomic_write_text(md, "\n".join(lines))
    return md, js


# --------------------------------------------------------------------------- GPU parts
def write_blip2_opt125m(folder: Path) -> Path:
    """A ``save_pretrained``-style BLIP-2 folder: the BLIP-2 (ViT-g/14, Q-Former) configuration with an
    OPT-125m language model, and a word-level tokenizer built here (no download)."""
    from transformers import Blip2Config, OPTConfig

    from prompttune.backbones.blip2 import make_world_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_world_tokenizer()  # the synthetic world's words: the captions the check trains on tokenise
    tok.save_pretrained(str(folder))
    words = tok.get_vocab()
    text = OPTConfig(vocab_size=len(words), hidden_size=768, num_hidden_layers=12, ffn_dim=3072,  # OPT-125m
                     num_attention_heads=12, word_embed_proj_dim=768, max_position_embeddings=2048,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = Blip2Config(text_config=text.to_dict())  # vision and Q-Former: BLIP-2's defaults (ViT-g/14, 224 px)
    cfg.save_pretrained(str(folder))
    return folder


def probe_attention() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(8, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, q, q)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, q, q)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
    return {"backend": sdpa_backend_from_kernels(names), "kernels": names, "shape": "8x12x197x64",
            "flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled()}


def precision_agreement(method: str, overrides: list[str]) -> dict[str, Any]:
    """Loss and the task's metric on one fixed batch, fp32 vs bf16 autocast, same weights."""
    import torch

    from prompttune.bench import autocast_for, compose_for, take_batches, to_device
    from prompttune.runs import build

    cfg = compose_for(method, [*overrides, "trainer=gpu"])
    backbone, dm, m, task = build(cfg)
    dm.setup("fit")
    batch = to_device(take_batches(dm.train_dataloader(), 1)[0], torch.device("cuda"))
    backbone.cuda()
    m.cuda().eval()
    task.cuda()
    res = {}
    for prec in ("32-true", "bf16-mixed"):
        with torch.no_grad(), autocast_for(prec, torch.device("cuda")):
            b = dict(batch)
            if m.consumes == "image_features":
                b["features"] = backbone.encode_image(b["image"]).float()
            out = m(backbone, b)
            loss = float(task.loss(out, b))
            task.update(out, b, "test")
            metrics = {k: float(v) for k, v in task.compute("test").items()
                       if isinstance(v, (int, float)) or getattr(v, "numel", lambda: 0)() == 1}
            task.reset("test")
        res[prec] = {"loss": loss, **metrics}
    agree = agreement(res["32-true"], res["bf16-mixed"])
    metric_keys = [k for k in agree if k != "loss"]
    return {"loss_rel_diff": agree.get("loss", {}).get("rel_diff"),
            "metric_rel_diff": max((agree[k]["abs_diff"] for k in metric_keys), default=None),
            "precision_agreement": agree}


def ddp_fit(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "prompttune", "fit", "experiments/smoke.yaml", "method=linear_probe",
           "trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=1", f"run_dir={out / 'ddp_run'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    res = {"command": " ".join(cmd[1:]), "rc": proc.returncode, "seconds": time.perf_counter() - t0}
    rfile = out / "ddp_run" / "result.json"
    if rfile.is_file():
        r = json.loads(rfile.read_text())
        res.update(status=r.get("status"), devices=r.get("devices"), metrics=r.get("metrics"))
    res["backend"] = "nccl" if "nccl" in (proc.stdout + proc.stderr).lower() or proc.returncode == 0 else "?"
    if proc.returncode:
        res["stderr_tail"] = (proc.stderr or proc.stdout)[-1500:]
    return res


def run(out: Path, budget_s: float = 420.0, steps: int = 10) -> int:
    require_gpu()
    import tempfile

    import torch

    from prompttune.bench import bench_method, split_options

    t0 = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "methods": [], "skipped": []}
    failed = False
    blip2_dir = Path(tempfile.mkdtemp(prefix="prompttune-blip2-opt125m-"))

    def spent() -> float:
        return time.perf_counter() - t0

    try:
        report["attention"] = probe_attention()
    except Exception as err:  # noqa: BLE001 - recorded, the rest still runs
        report["attention"] = {"backend": f"error: {err}"}
        failed = True
    for method, overrides, bs in METHODS:
        if spent() > budget_s:
            report["skipped"].append(method)
            continue
        ov = [o.format(blip2_dir=blip2_dir) for o in overrides] + [f"data.batch_size={bs}"]
        row: dict[str, Any] = {"method": method}
        try:
            if "{blip2_dir}" in " ".join(overrides):
                write_blip2_opt125m(blip2_dir)
            opts, rest = split_options(["bench.warmup=3", "bench.cache_epochs=2", "bench.cache_batches=4"])
            row.update(bench_method(method, [*rest, *ov, "trainer=gpu"], steps=steps, opts=opts))
            row.update(precision_agreement(method, ov))
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            row["traceback"] = traceback.format_exc()[-2000:]
            failed = True
        report["methods"].append(row)
        torch.cuda.empty_cache()
        write_report(out, {**report, "elapsed_s": spent()})  # keep what is measured so far
    if spent() < budget_s:
        method, overrides, bs = next(m for m in METHODS if m[0] == COMPILE_METHOD)
        comp: dict[str, Any] = {"method": method}
        try:
            times = {}
            for flag in ("false", "true"):
                opts, rest = split_options([f"bench.compile={flag}", "bench.memory=false", "bench.warmup=5"])
                times[flag] = bench_method(method, [*rest, *overrides, f"data.batch_size={bs}", "trainer=gpu"],
                                           steps=steps, opts=opts)["fw_step_ms"]
            comp.update(eager_ms=times["false"], compiled_ms=times["true"], speedup=times["false"] / times["true"])
        except Exception as err:  # noqa: BLE001
            comp["error"] = f"{type(err).__name__}: {err}"[:300]
            failed = True
        report["compile"] = comp
    else:
        report["skipped"].append("compile")
    if spent() < budget_s + 60:
        try:
            report["ddp"] = ddp_fit(out)
            failed |= report["ddp"]["rc"] != 0
        except Exception as err:  # noqa: BLE001
            report["ddp"] = {"rc": -1, "error": str(err)}
            failed = True
    else:
        report["skipped"].append("ddp")
    report["elapsed_s"] = spent()
    md, js = write_report(out, report)
    print(md.read_text())
    print(f"written: {md} and {js}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prompttune.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new part starts after this many seconds")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    a = p.parse_args(argv)
    from prompttune.runs import quiet_lightning

    quiet_lightning()
    return run(Path(a.out), a.budget_s, a.steps)


if __name__ == "__main__":
    raise SystemExit(main())
