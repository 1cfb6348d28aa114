import subprocess
import sys


def test_torchvision_and_its_dependents_import():
    code = "import prompttune._tvshim, torchvision, torchmetrics, lightning, open_clip, timm; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_shim_defines_nothing_when_the_ops_exist():
    from prompttune import _tvshim

    import torch
    import torchvision  # noqa: F401

    assert hasattr(torch.ops.torchvision, "nms")
    assert _tvshim.define_missing_ops() is False  # already defined (by the extension or by the shim): no-op
