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
# uv installs the same resolution much faster than pip (about 32 s for this whole script from a
# cold cache on a 2-core machine, against ~3.5 min with pip), so it is used when it can be
# installed; pip's own configuration (index-url, extra-index-url, find-links, constraint;
# pip.conf or PIP_* variables) is passed on to it, and any failure falls back to pip.
# PROMPTTUNE_INSTALLER=pip forces pip.
pip_install() {
  if [ "${PROMPTTUNE_INSTALLER:-uv}" = uv ] && "${PIP[@]}" uv >/dev/null 2>&1; then
    local cfg
    mapfile -t cfg < <(.venv/bin/python - <<'PY'
import shlex, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flag = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
        "constraint": "--constraint"}
seen = set()
for line in out.splitlines():
    key, _, value = line.partition("=")
    opt = flag.get(key.rsplit(".", 1)[-1])
    for v in shlex.split(value.strip().strip("'\"")) if opt else ():
        if (opt, v) not in seen:
            seen.add((opt, v)); print(opt); print(v)
PY
)
    if .venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match \
        ${cfg[@]+"${cfg[@]}"} "$@"; then
      return 0
    fi
    echo "install: uv failed; installing with pip"
  fi
  "${PIP[@]}" "$@"
}
mode=${PROMPTTUNE_TORCH:-auto}
if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=any; else mode=cpu; fi
fi
if [ "$mode" = cpu ]; then
  echo "install: CPU-only machine: torch pinned by constraints/cpu.txt"
  pip_install -c constraints/cpu.txt -e '.[dev]'
else
  echo "install: torch as resolved by pip (GPU or user-provided)"
  pip_install -e '.[dev]'
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Runs at interpreter start; imports nothing heavy; acts only when torchvision's C++
# extension cannot load (a CUDA torchvision beside a CPU torch). Harmless elsewhere.
printf 'import sys; exec("try:\\n import prompttune._tvshim\\nexcept Exception:\\n pass")\n' > "$site/prompttune_tvshim.pth"
# The check imports what `prompttune` commands and the demo's children import, with bytecode
# writing on: each module it imports is compiled once, into __pycache__ beside it. Where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines), every later process would
# otherwise recompile them on import (`import lightning` 15 s instead of 7). Compiling the whole
# venv instead (`uv pip install --compile-bytecode`) took 35 s on 2 cores; these imports take ~10 s.
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python - <<'PY'
import torchvision, lightning, open_clip, timm, torchmetrics, matplotlib.pyplot
import prompttune, prompttune.cli, prompttune.sweep, prompttune.report, prompttune.module
from prompttune import registry
from prompttune.demo import _preimport
registry.load_all()
_preimport()
print("install: ok, torch", __import__("torch").__version__)
PY
