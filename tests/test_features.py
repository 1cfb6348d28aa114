"""The frozen-feature store (prompttune/features.py): equality with recomputed features, key
sensitivity (weights file, transform, image files), corruption recovery, one writer among
concurrent processes, and the module filling its cache from the store in a real `fit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from prompttune import features
from prompttune.data.base import ImageTransform, ListDataset


class TinyEncoder(nn.Module):
    """A frozen 'backbone' with the encode_image hook: conv + global pool."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.requires_grad_(False).eval()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def _images(folder, n=10, size=20):
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    items = []
    for i in range(n):
        p = folder / f"im{i}.png"
        Image.fromarray(rs.randint(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(p)
        items.append({"path": str(p), "label": i % 3})
    return items


def _dataset(items, size=16, augment=False):
    return ListDataset(items, ImageTransform(size, (0.5,) * 3, (0.25,) * 3, augment=augment))


def _compute(model, ds):
    return lambda: features.encode_dataset(model.encode_image, ds, torch.device("cpu"), batch_size=4)


def _direct(model, ds):
    """Features recomputed the plain way: each item through the transform and the encoder."""
    with torch.no_grad():
        return torch.cat([model.encode_image(ds[i]["image"][None]) for i in range(len(ds))])


def test_cached_features_equal_recomputed(tmp_path):
    model, ds = TinyEncoder(), _dataset(_images(tmp_path / "img"))
    store = features.FeatureStore(tmp_path / "store")
    key = features.feature_key(model, ds)
    f1, m1 = store.get_or_compute(key, _compute(model, ds))
    assert (store.misses, store.hits) == (1, 0) and bool(m1.all())
    calls = []
    f2, _ = store.get_or_compute(key, lambda: calls.append(1))  # a hit never computes
    assert not calls and store.hits == 1
    assert torch.equal(f1, f2)
    assert torch.allclose(f2, _direct(model, ds), atol=1e-6)
    assert store.path_for(key).suffix == ".safetensors" and store.path_for(key).is_file()


def test_changed_weight_file_transform_or_image_misses(tmp_path):
    from safetensors.torch import load_file, save_file

    items = _images(tmp_path / "img")
    ds = _dataset(items)
    wfile = tmp_path / "w.safetensors"
    save_file(TinyEncoder(0).state_dict(), str(wfile))

    def loaded():
        m = TinyEncoder(1)
        m.load_state_dict(load_file(str(wfile)))
        return m

    base = features.feature_key(loaded(), ds)
    assert features.feature_key(loaded(), ds) == base  # same file, fresh objects: same key
    sd = load_file(str(wfile))
    sd["conv.bias"][0] += 1e-3  # one weight changed in the file
    save_file(sd, str(wfile))
    assert features.feature_key(loaded(), ds)["weights"] != base["weights"]
    assert features.feature_key(TinyEncoder(0), _dataset(items, size=12))["transform"] != base["transform"]
    resized = ImageTransform(16, (0.5,) * 3, (0.25,) * 3, resize_ratio=1.14)
    assert features.transform_key(resized) != base["transform"]
    time.sleep(0.01)
    Image.new("RGB", (20, 24), (1, 2, 3)).save(items[3]["path"])  # an image file replaced
    assert features.feature_key(TinyEncoder(0), _dataset(items))["images"] != base["images"]
    store = features.FeatureStore(tmp_path / "store")
    paths = {store.path_for(features.feature_key(m, d))
             for m, d in [(TinyEncoder(0), ds), (loaded(), ds), (TinyEncoder(0), _dataset(items, size=12))]}
    assert len(paths) == 3


def test_randomising_or_undescribable_transform_is_never_stored(tmp_path):
    items = _images(tmp_path / "img", n=3)
    assert features.feature_key(TinyEncoder(), _dataset(items, augment=True)) is None
    assert features.feature_key(TinyEncoder(), ListDataset(items, lambda img: torch.zeros(3, 4, 4))) is None

    class NoItems(torch.utils.data.Dataset):
        transform = ImageTransform(8, (0.5,) * 3, (0.5,) * 3)

    assert features.feature_key(TinyEncoder(), NoItems()) is None


def test_corrupt_store_file_is_set_aside_and_recomputed(tmp_path):
    model, ds = TinyEncoder(), _dataset(_images(tmp_path / "img"))
    store = features.FeatureStore(tmp_path / "store")
    key = features.feature_key(model, ds)
    good, _ = store.get_or_compute(key, _compute(model, ds))
    path = store.path_for(key)
    path.write_bytes(path.read_bytes()[:100])  # truncated mid-write by some other tool
    again, _ = features.FeatureStore(tmp_path / "store").get_or_compute(key, _compute(model, ds))
    assert torch.equal(again, good)
    aside = list(path.parent.glob(path.name + ".corrupt-*"))
    assert len(aside) == 1, "the bad file was not kept aside"
    assert features.FeatureStore(tmp_path / "store").get(key) is not None  # the rewritten file loads

    other = features.feature_key(model, _dataset(_images(tmp_path / "img2", n=4)))
    from safetensors.torch import save_file  # a well-formed file whose key is another's

    save_file({"features": torch.zeros(10, 8), "filled": torch.ones(10, dtype=torch.bool)}, str(path),
              metadata={"format": features.FORMAT, "key": json.dumps(other, sort_keys=True)})
    assert store.get(key) is None and not path.exists()


def test_rows_the_dataset_never_yields_stay_unfilled(tmp_path):
    items = _images(tmp_path / "img", n=5)
    open(items[2]["path"], "wb").write(b"not a png")
    ds = ListDataset(items, ImageTransform(16, (0.5,) * 3, (0.25,) * 3), on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping"):
        feats, filled = features.encode_dataset(TinyEncoder().encode_image, ds, torch.device("cpu"), batch_size=2)
    assert filled.tolist() == [True, True, False, True, True]
    assert feats.shape == (5, 8)


_WORKER = textwrap.dedent("""
    import sys, time, torch
    from prompttune import features
    root, counter, out = sys.argv[1:4]
    key = {"format": features.FORMAT, "images": "6:x", "weights": "w"}
    def compute():
        with open(counter, "a") as fh:
            fh.write("computed\\n")
        time.sleep(1.0)  # long enough that the other process asks while this one computes
        return torch.arange(12.0).view(6, 2), torch.ones(6, dtype=torch.bool)
    feats, _ = features.FeatureStore(root).get_or_compute(key, compute)
    torch.save(feats, out)
""")


def test_two_processes_same_key_compute_once_and_write_one_file(tmp_path):
    root, counter = tmp_path / "store", tmp_path / "count.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(counter), str(tmp_path / f"o{i}.pt")],
                              env=env) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert counter.read_text().count("computed") == 1, "both processes computed the same key"
    assert len(list(root.glob("*.safetensors"))) == 1 and not list(root.glob(".*.tmp"))
    a, b = torch.load(tmp_path / "o0.pt"), torch.load(tmp_path / "o1.pt")
    assert torch.equal(a, b) and torch.equal(a, torch.arange(12.0).view(6, 2))


def test_fit_fills_the_cache_from_the_store(tmp_path, monkeypatch):
    """A real `fit` twice on one store: the second reads every split from it, with the same
    result as a run with the store off."""
    from prompttune.cli import main

    monkeypatch.setenv("PROMPTTUNE_HOME", str(tmp_path / "home"))
    full = ["trainer.limit_train_batches=1.0", "trainer.limit_test_batches=1.0", "trainer.cpu_threads=1"]
    results = {}
    for name, extra in (("a", []), ("b", []), ("off", ["features.store=false"])):
        rc = main(["fit", "experiments/smoke.yaml", "method=linear_probe", f"run_dir={tmp_path / name}", *full, *extra])
        assert rc == 0
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    a, b, off = results["a"]["feature_store"], results["b"]["feature_store"], results["off"]["feature_store"]
    assert set(a) == {"train", "test"} and not a["train"]["hit"] and not a["test"]["hit"]
    assert b["train"]["hit"] and b["test"]["hit"] and b["test"]["rows"] == a["test"]["rows"]
    assert off is None
    assert results["b"]["metrics"] == results["a"]["metrics"] == results["off"]["metrics"]
    assert len(list((tmp_path / "home" / "features").glob("*.safetensors"))) == 2


def _fit_linear_probe(tmp_path, fused: bool, epochs: int = 3, callbacks=(), ckpt_path=None, on_loss=None):
    import warnings
    from pathlib import Path

    from prompttune import bench
    from prompttune.runs import build, make_module

    cfg = bench.compose_for("linear_probe", [f"method.optim.epochs={epochs}", "trainer.cpu_threads=1"])
    backbone, dm, method, task = build(cfg)
    module = make_module(cfg, backbone, method, task)
    module.fused_epochs = fused
    calls = []
    run = module._run_fused_epoch
    module._run_fused_epoch = lambda *a: (calls.append(1), run(*a))
    if on_loss is not None:
        loss_fn = module.task.loss
        module.task.loss = lambda *a: (on_loss(module), loss_fn(*a))[1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        trainer = bench._trainer(cfg, Path(tmp_path), epochs, list(callbacks))
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer, calls


def test_fused_epochs_train_exactly_like_the_lightning_loop(tmp_path, monkeypatch):
    """Linear probe on cached features: the fused epoch loop gives the same parameters, global
    step, learning rate and step count as Lightning's per-batch loop (per-step cosine schedule)."""
    monkeypatch.setenv("PROMPTTUNE_FEATURE_STORE", str(tmp_path / "store"))
    fused, t_fused, calls = _fit_linear_probe(tmp_path / "a", True)
    plain, t_plain, calls_plain = _fit_linear_probe(tmp_path / "b", False)
    assert len(calls) == 3 and not calls_plain  # every epoch fused (the store filled the cache up front)
    assert t_fused.global_step == t_plain.global_step > 3
    assert fused._steps == plain._steps and fused.stats["samples_per_s"] > 0
    assert t_fused.optimizers[0].param_groups[0]["lr"] == pytest.approx(t_plain.optimizers[0].param_groups[0]["lr"])
    for (name, a), (_, b) in zip(fused.method.named_parameters(), plain.method.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), f"{name} differs between fused and Lightning epochs"
    assert not torch.equal(fused.method.head.weight, torch.zeros_like(fused.method.head.weight))


def test_a_fused_epoch_cut_short_by_an_interrupt_resumes_exactly(tmp_path, monkeypatch):
    """An interrupt in the middle of a fused epoch keeps the previous epoch's last.ckpt (the cut
    epoch is not complete), and the resumed run ends with the uninterrupted run's weights (each
    remaining epoch fused once, none repeated or skipped)."""
    from prompttune.run_callbacks import LastCheckpoint

    monkeypatch.setenv("PROMPTTUNE_FEATURE_STORE", str(tmp_path / "store"))
    ref, t_ref, _ = _fit_linear_probe(tmp_path / "ref", True, epochs=4)
    ckpt = tmp_path / "last.ckpt"
    state = {"n": 0, "stopped": False}

    def stop_mid_epoch_2(module):
        if module.current_epoch == 2:
            state["n"] += 1
            if state["n"] == 2:  # after the epoch's first step: a partial fused epoch
                module.trainer.should_stop = state["stopped"] = True

    cut, t_cut, calls = _fit_linear_probe(tmp_path / "cut", True, epochs=4, on_loss=stop_mid_epoch_2,
                                          callbacks=[LastCheckpoint(ckpt, interrupted=lambda: state["stopped"])])
    assert state["stopped"] and len(calls) == 3 and cut.fused_epoch_incomplete
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1  # epochs 0 and 1 whole; the cut epoch 2 not kept
    resumed, t_res, calls_res = _fit_linear_probe(tmp_path / "res", True, epochs=4, ckpt_path=str(ckpt))
    assert len(calls_res) == 2  # epochs 2 and 3 again, each fused, none repeated or skipped
    assert t_res.global_step == t_ref.global_step
    for (name, a), (_, b) in zip(resumed.method.named_parameters(), ref.method.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), f"{name}: resumed differs from uninterrupted"
