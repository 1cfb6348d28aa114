"""Make ``import torchvision`` work beside a CPU-only torch.

PyPI's torchvision wheels are CUDA builds. Beside the CPU build of torch their C++
extension cannot load, so the ``torchvision::nms`` / ``torchvision::qnms`` operators are
never defined, and torchvision's own fake-tensor registrations then fail with
``operator torchvision::nms does not exist`` -- which breaks torchmetrics, lightning,
timm and open_clip, all of which import torchvision.

:func:`install` puts a one-shot finder on ``sys.meta_path``. When torchvision is first
imported it tries to load torchvision's extension itself; only if that fails does it
define the two operator schemas (with CPU kernels that raise a clear error: nothing in
prompttune uses NMS). Where the extension loads -- every GPU machine, or a proper CPU
torchvision -- nothing is touched. Importing this module costs nothing: torch is only
imported when torchvision is.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keeps the torch.library.Library alive


def _extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to fix
    folder = list(spec.submodule_search_locations)[0]
    names = [n for n in os.listdir(folder) if n.startswith("_C") and n.endswith((".so", ".pyd"))]
    if not names:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, names[0]))
    except (OSError, RuntimeError):
        return False
    return hasattr(torch.ops.torchvision, "nms")


def define_missing_ops() -> bool:
    """Define torchvision's NMS schemas if its extension cannot load. Returns True if it did."""
    global _LIB
    import torch

    if _LIB is not None or _extension_loads():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)

        def _unavailable(*args, _name=name, **kwargs):
            raise RuntimeError(
                f"torchvision::{_name} is unavailable: this torchvision is a CUDA build beside a "
                "CPU-only torch (prompttune defined the schema so that torchvision imports)."
            )

        lib.impl(name, _unavailable, "CPU")
    _LIB = lib
    return True


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            uninstall()
            try:
                define_missing_ops()
            except Exception as err:  # never make an import worse than it was
                print(f"prompttune: torchvision shim skipped ({err})", file=sys.stderr)
        return None  # let the normal finders import it


_FINDER = _Finder()


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    if "torchvision" in sys.modules or os.environ.get("PROMPTTUNE_NO_TVSHIM"):
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


install()
