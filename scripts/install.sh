#!/usr/bin/env bash
# Create .venv/ at the repo root and install prompttune into it (editable, with test deps).
#   GPU machines (nvidia-smi lists a GPU) or PROMPTTUNE_TORCH=any: torch as pip resolves it
#     (or the one you installed first), nothing pinned.
#   CPU-only machines: torch/torchvision pinned by constraints/cpu.txt (set PIP_EXTRA_INDEX_URL
#     to PyTorch's CPU index where the CPU wheel is not otherwise available), and a .pth hook
#     that lets PyPI's CUDA torchvision import beside the CPU torch (prompttune/_tvshim.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
mode=${PROMPTTUNE_TORCH:-auto}
if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=any; else mode=cpu; fi
fi
if [ "$mode" = cpu ]; then
  echo "install: CPU-only machine: torch pinned by constraints/cpu.txt"
  "${PIP[@]}" -c constraints/cpu.txt -e '.[dev]'
else
  echo "install: torch as resolved by pip (GPU or user-provided)"
  "${PIP[@]}" -e '.[dev]'
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Runs at interpreter start; imports nothing heavy; acts only when torchvision's C++
# extension cannot load (a CUDA torchvision beside a CPU torch). Harmless elsewhere.
printf 'import sys; exec("try:\\n import prompttune._tvshim\\nexcept Exception:\\n pass")\n' > "$site/prompttune_tvshim.pth"
.venv/bin/python -c 'import torchvision, lightning, open_clip, timm, torchmetrics; import prompttune; print("install: ok, torch", __import__("torch").__version__)'
