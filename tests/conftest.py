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


@pytest.fixture(scope="session")
def make_fdrd_dm(tmp_path_factory, tiny_clip):
    """``make(n_train)``: a synthetic FDRD DataModule (n_train pairs per class, one test pair),
    configured for ``tiny_clip`` and built; the files are written once per n_train."""
    from prompttune.data.fdrd import FDRDDataModule, write_fdrd

    roots = {}

    def make(n_train: int = 1):
        if n_train not in roots:
            roots[n_train] = tmp_path_factory.mktemp(f"fdrd_n{n_train}")
            write_fdrd(roots[n_train], n_train=n_train, n_val=0, n_test=1, side=32, seed=1)
        dm = FDRDDataModule(root=str(roots[n_train]), train_file="FDRD/train/synth_train.json",
                            test_file="FDRD/test/synth_test.json", batch_size=8, eval_batch_size=64, seed=0)
        dm.configure_for(tiny_clip)
        dm.check()
        dm.build()
        return dm

    return make


@pytest.fixture(scope="session")
def retrieval_batch():
    """``batch(dm, backbone, split, n)``: the first n items of a split, collated, with the frozen
    backbone's pooled image features (what a feature-consuming retrieval method receives)."""
    import torch

    def batch(dm, backbone, split="train", n=8):
        ds = dm.datasets[split]
        b = ds.collate([ds[i] for i in range(n)])
        with torch.no_grad():
            b["features"] = backbone.encode_image(b["image"]).float()
        return b

    return batch


@pytest.fixture
def tiny_sweep(tmp_path):
    """``tiny_sweep(name, grid, seeds, extra, cpu_threads, epochs, report)``: a smoke-sized sweep file
    (random-weight backbones, 2 training batches, 1 test batch) whose runs go to ``tmp_path / "runs"``."""

    def write(name="t", grid="{method: [zero_shot, linear_probe]}", seeds="[0, 1]", extra="", cpu_threads=None,
              epochs=1, report="{metric: test/acc}"):
        threads = f", cpu_threads: {cpu_threads}" if cpu_threads else ""
        f = tmp_path / f"{name}.yaml"
        f.write_text(f"""sweep:
  name: {name}
  runs_dir: {tmp_path / 'runs'}
  grid: {grid}
  seeds: {seeds}
  report: {report}
backbone: {{weights: random}}
data: {{batch_size: 8}}
method: {{optim: {{epochs: {epochs}}}}}
trainer: {{limit_train_batches: 2, limit_test_batches: 1{threads}}}
{extra}""")
        return f

    return write
