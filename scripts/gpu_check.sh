#!/usr/bin/env bash
# One short GPU check of prompttune (< 8 minutes on one H100/H200): random weights at real sizes
# (CLIP ViT-B/16, ViT-B/16, MAE-VQGAN ViT-L, BLIP-2 with an OPT-125m-sized LM); bf16-mixed vs fp32
# agreement, step time / samples/s / TFLOP/s / MFU per method, the fused SDPA kernel in use,
# torch.compile vs eager, a 1-GPU DDP fit through NCCL, peak memory vs full fine-tuning.
# Writes gpu_check.md + gpu_check.json into $OUT (or runs/gpu_check); exits 2 when no GPU is visible.
# Implementation and options: prompttune/gpu_check.py (python -m prompttune.gpu_check --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec "$PY" -m prompttune.gpu_check --out "${OUT:-runs/gpu_check}" "$@"
