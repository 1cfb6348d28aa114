"""The zoo machinery (prompttune/zoo/__init__.py) on toy entries: build, bars, corrupt and stale
caches, file modes, determinism across thread counts, RNG isolation. No real entry is built."""

import json
import os
import stat

import pytest
import torch
from torch import nn

from prompttune import zoo

CALLS = {"n": 0}


def _toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def _toy_pretrain(model: nn.Module, folder, steps: int = 20) -> dict:
    """A few Adam steps on a seeded regression whose matmuls are big enough to be split across threads."""
    CALLS["n"] += 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    y = torch.randn(512, 4, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"final_loss": float(loss.detach()), "score": 0.9, "threads_seen": torch.get_num_threads()}


def _entry(name: str, bars=(zoo.Bar("score", min=0.5, why="toy"),)) -> zoo.ZooEntry:
    if name in zoo.ZOO._items:
        return zoo.get(name)
    return zoo.register(zoo.ZooEntry(name=name, backbone="none", description="toy", make_model=_toy_model,
                                     pretrain=_toy_pretrain, version="1", bars=tuple(bars)))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTTUNE_HOME", str(tmp_path))
    return tmp_path


def test_build_writes_readable_weights_and_meta_with_bars(home):
    e = _entry("toy-ok")
    path = zoo.build("toy-ok")
    assert path == e.weights and e.built() and e.problem() is None
    for f in (e.weights, e.meta):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, f
    meta = json.loads(e.meta.read_text())
    assert meta["version"] == "1" and meta["format"] == zoo.FORMAT and meta["bars"] == {"score >= 0.5": True}
    assert meta["bytes"] == e.weights.stat().st_size and len(meta["sha256"]) == 64
    assert meta["threads_seen"] == 1  # built with one intra-op thread whatever the caller's setting
    n = CALLS["n"]
    zoo.ensure("toy-ok")
    assert CALLS["n"] == n  # a usable build is not rebuilt


def test_missed_bar_fails_loudly_and_caches_nothing(home):
    e = _entry("toy-weak", bars=(zoo.Bar("score", min=0.95, why="needs to be competent"),))
    with pytest.raises(zoo.ZooBuildError, match=r"score = 0\.9, needs >= 0\.95 \(needs to be competent\)"):
        zoo.build("toy-weak")
    assert not e.weights.exists() and (e.folder / "failed_bars.json").is_file()
    with pytest.raises(zoo.ZooBuildError):
        zoo.load_model("toy-weak")


def test_a_failed_recipe_is_not_rebuilt_until_it_changes_or_is_forced(home, monkeypatch):
    _entry("toy-weak2", bars=(zoo.Bar("score", min=0.95, why="competent"),))
    with pytest.raises(zoo.ZooBuildError):
        zoo.build("toy-weak2")
    n = CALLS["n"]
    # the same deterministic recipe: fails at once with the recorded values (each run of a sweep
    # would otherwise pretrain again for nothing), and says how to retry
    with pytest.raises(zoo.ZooBuildError, match=r"score = 0\.9, needs >= 0\.95.*earlier build.*--force"):
        zoo.ensure("toy-weak2")
    assert CALLS["n"] == n
    with pytest.raises(zoo.ZooBuildError, match="missed"):
        zoo.build("toy-weak2", force=True)
    assert CALLS["n"] == n + 1
    monkeypatch.setattr(zoo.ZooEntry, "recipe", lambda self: "a changed recipe")  # a fixed rerun is not blocked
    with pytest.raises(zoo.ZooBuildError, match="missed"):
        zoo.build("toy-weak2")
    assert CALLS["n"] == n + 2


def test_truncated_weights_are_set_aside_and_rebuilt(home, capsys):
    e = _entry("toy-trunc")
    zoo.build("toy-trunc")
    good = e.weights.read_bytes()
    e.weights.write_bytes(good[:50])
    assert "unreadable" in e.problem() or "truncated" in e.problem()
    model = zoo.load_model("toy-trunc")  # rebuilds instead of raising SafetensorError
    assert e.weights.read_bytes() == good  # deterministic rebuild: the same bytes
    out = capsys.readouterr().out
    assert "set aside to" in out and "rebuilt" in out
    aside = [p for p in e.folder.parent.iterdir() if p.name.startswith("v1.bad-")]
    assert len(aside) == 1 and (aside[0] / "weights.safetensors").stat().st_size == 50
    assert isinstance(model, nn.Sequential)


@pytest.mark.parametrize("meta", ['{"version": "0", "format": 2}', '{"version": "1"}', "{not json"])
def test_stale_or_unreadable_meta_is_rebuilt(home, meta, capsys):
    e = _entry("toy-stale")
    zoo.build("toy-stale")
    e.meta.write_text(meta)
    assert e.problem()
    zoo.ensure("toy-stale")
    assert e.problem() is None and "set aside" in capsys.readouterr().out


def test_force_rebuilds_and_keeps_the_old_build_aside(home):
    e = _entry("toy-force")
    zoo.build("toy-force")
    n = CALLS["n"]
    zoo.build("toy-force", force=True)
    assert CALLS["n"] == n + 1 and e.problem() is None
    assert any(p.name.startswith("v1.bad-") for p in e.folder.parent.iterdir())


def test_build_is_independent_of_the_callers_thread_count(home):
    e = _entry("toy-threads")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        zoo.build("toy-threads")
        first = json.loads(e.meta.read_text())["sha256"]
        torch.set_num_threads(2)
        zoo.build("toy-threads", force=True)
        assert torch.get_num_threads() == 2  # restored after the build
        assert json.loads(e.meta.read_text())["sha256"] == first
    finally:
        torch.set_num_threads(threads)


def test_loading_does_not_touch_the_callers_random_state(home):
    _entry("toy-rng")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.load_model("toy-rng", "random")
    assert torch.equal(torch.rand(3), expected)
    a = zoo.load_model("toy-rng", "random")[0].weight
    b = zoo.load_model("toy-rng", "random")[0].weight
    assert torch.equal(a, b)  # the untrained model is always the same one
    with pytest.raises(ValueError, match="'pretrained' or 'random'"):
        zoo.load_model("toy-rng", "imagenet")


def test_every_real_entry_is_registered_with_bars():
    names = zoo.names()
    for n in ("clip-tiny", "clip-tiny-s1", "clip-tiny-s2", "clip-tiny-p8", "vit-mae-tiny", "blip2-tiny",
              "mae-vqgan-tiny"):
        assert n in names
        assert zoo.get(n).bars, f"{n} has no competence bar"
    assert zoo.get("vit-mae-tiny").info["mean"] == (0.5, 0.5, 0.5)


def test_backbones_define_no_zoo_entries_and_import_no_methods():
    from pathlib import Path

    import prompttune.backbones as bb

    for f in Path(bb.__file__).parent.glob("*.py"):
        src = f.read_text()
        assert "zoo.register(" not in src, f
        assert "prompttune.methods" not in src, f


def test_cli_zoo_list_shows_each_entrys_bars_before_any_build(cli, tmp_path):
    r = cli("zoo", "list", env={"PROMPTTUNE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "linear_probe_acc >= 0.5: not built" in r.stdout
    assert "label_recon_iou >= 0.8: not built" in r.stdout
    assert "position_robustness >= 0.8: not built" in r.stdout


def test_cli_zoo_build_of_an_unknown_entry_exits_2(cli, tmp_path):
    r = cli("zoo", "build", "clip-huge", env={"PROMPTTUNE_HOME": str(tmp_path)})
    assert r.returncode == 2 and "unknown zoo entry 'clip-huge'" in r.stderr and "clip-tiny" in r.stderr


def _converted_pretrain(model: nn.Module, folder) -> dict:
    """A toy entry built from another one (as vit-clip-tiny is from clip-tiny): copies its weights."""
    src = zoo.load_model("toy-source")
    model.load_state_dict(src.state_dict())
    return {"score": 0.9}


def test_an_entry_built_from_another_is_stale_once_that_one_is_rebuilt(home, capsys):
    _entry("toy-source")
    if "toy-converted" not in zoo.ZOO._items:
        zoo.register(zoo.ZooEntry(name="toy-converted", backbone="none", description="toy", make_model=_toy_model,
                                  pretrain=_converted_pretrain, version="1", bars=(zoo.Bar("score", min=0.5),),
                                  needs=("toy-source",)))
    zoo.build("toy-converted")  # builds toy-source first, through load_model
    conv = zoo.get("toy-converted")
    assert zoo.get("toy-source").built() and conv.problem() is None
    assert json.loads(conv.meta.read_text())["sources"] == {"toy-source": zoo.read_meta("toy-source")["sha256"]}
    meta = json.loads(zoo.get("toy-source").meta.read_text())
    meta["sha256"] = "f" * 64  # the source rebuilt into other weights
    zoo.get("toy-source").meta.write_text(json.dumps(meta))
    why = conv.problem()
    assert why and "toy-source" in why and "ffffffffffff" in why
    zoo.ensure("toy-converted")  # set aside and rebuilt from the source as it is now
    assert conv.problem() is None
    assert "set aside" in capsys.readouterr().out
