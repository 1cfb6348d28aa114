import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports torchvision (lightning, torchmetrics, open_clip, timm do).
import prompttune._tvshim  # noqa: F401

# One cache per test session: synthetic data is generated once; zoo weights are never
# built by the default (fast) tests, which use the zoo architectures untrained.
_HOME = tempfile.mkdtemp(prefix="prompttune-test-home-")
os.environ.setdefault("PROMPTTUNE_HOME", _HOME)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli(tmp_path):
    """Run the CLI in a subprocess; returns CompletedProcess (text)."""

    def run(*args, timeout=300, env=None):
        e = dict(os.environ, **(env or {}))
        return subprocess.run([sys.executable, "-m", "prompttune", *map(str, args)], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, env=e)

    return run


@pytest.fixture(scope="session")
def tiny_clip():
    from prompttune.backbones.clip import CLIPBackbone

    return CLIPBackbone(zoo_entry="clip-tiny", weights="random")


@pytest.fixture(scope="session")
def fine_dm(tiny_clip):
    from prompttune.config import compose
    from prompttune.runs import build_datamodule

    cfg = compose(REPO / "experiments/smoke.yaml", ["method=coop", "data.shots=2"])
    return build_datamodule(cfg, tiny_clip)
