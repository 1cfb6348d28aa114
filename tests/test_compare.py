"""``prompttune compare``: one setting per side, paired by seed and test item, on run records (no training)."""

import json

import numpy as np
import pytest

from prompttune import compare, demo
from prompttune.cli import main
from prompttune.config import ConfigError


def _run(root, name, seed, scores, metric="miou", **tags):
    d = root / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"status": "completed", "method": tags.get("method"), "seed": seed,
                                               "tags": tags, "metrics": {f"test/{metric}": float(np.mean(scores))}}))
    n = len(scores)
    (d / "test_items.json").write_text(json.dumps({"n": n, "index": list(range(n))[::-1],
                                                   "scores": {metric: list(scores)[::-1]}}))


def _grid(root):
    # InMeMo at two learning rates, two seeds each; a frozen baseline run once
    _run(root, "np", 0, [0.5, 0.5, 0.5, 0.5], method="no_prompt")
    _run(root, "a40s0", 0, [0.9, 0.7, 0.5, 0.5], method="inmemo", **{"method.optim.lr": 40.0})
    _run(root, "a40s1", 1, [0.7, 0.7, 0.7, 0.5], method="inmemo", **{"method.optim.lr": 40.0})
    _run(root, "a1s0", 0, [0.5, 0.5, 0.5, 0.4], method="inmemo", **{"method.optim.lr": 1e-12})
    _run(root, "a1s1", 1, [0.5, 0.5, 0.4, 0.5], method="inmemo", **{"method.optim.lr": 1e-12})


def test_the_difference_is_the_hand_computed_mean_and_a_frozen_side_pairs_with_every_seed(tmp_path):
    _grid(tmp_path)
    r = compare.compare(tmp_path, "method=inmemo,lr=40", "method=no_prompt", metric="test/miou")
    # A - B per item: seed 0 (.4, .2, 0, 0), seed 1 (.2, .2, .2, 0): mean 1.2 / 8
    assert r["diff"] == pytest.approx(0.15)
    assert r["per_seed"] == pytest.approx([0.15, 0.15])
    assert r["n_seeds"] == 2 and r["n_items"] == 4
    assert r["a"] == "method=inmemo, method.optim.lr=40.0" and r["b"] == "method=no_prompt"
    assert r["ci"][0] <= 0.15 <= r["ci"][1] and r["scale"] == 100.0
    # the maths is the demo's: the same pairing through a Claim
    claim = demo.Claim("icl", "p", {"method": "inmemo", "method.optim.lr": 40}, {"method": "no_prompt"}, "test/miou")
    via_claim = demo.check_claim(claim, tmp_path)
    assert via_claim["diff"] == r["diff"] and via_claim["ci"] == r["ci"]


def test_numbers_match_as_numbers_and_keys_by_their_last_part(tmp_path):
    _grid(tmp_path)
    r = compare.compare(tmp_path, "method=inmemo,method.optim.lr=1.0e-12", "method=no_prompt", metric="miou")
    assert r["diff"] == pytest.approx((-0.1 - 0.1) / 8)
    assert r["a"] == "method=inmemo, method.optim.lr=1e-12"


def test_a_seed_filter_compares_one_seed(tmp_path):
    _grid(tmp_path)
    r = compare.compare(tmp_path, "method=inmemo,lr=40,seed=1", "method=no_prompt", metric="miou")
    assert r["n_seeds"] == 1 and r["diff"] == pytest.approx(0.6 / 4)
    r = compare.compare(tmp_path, "method=inmemo,lr=40,seed=0", "method=inmemo,lr=1e-12,seed=0", metric="miou")
    assert r["diff"] == pytest.approx((0.4 + 0.2 + 0.0 + 0.1) / 4)


def test_a_filter_naming_several_settings_or_none_is_refused_with_the_settings_listed(tmp_path):
    _grid(tmp_path)
    with pytest.raises(ConfigError, match=r"names 2 settings.*lr=1e-12.*lr=40.0"):
        compare.compare(tmp_path, "method=inmemo", "method=no_prompt", metric="miou")
    with pytest.raises(ConfigError, match=r"B=\{'method': 'vp'\}: no completed run.*method=no_prompt"):
        compare.compare(tmp_path, "method=inmemo,lr=40", "method=vp", metric="miou")
    with pytest.raises(ConfigError, match="expected key=value"):
        compare.parse_filter("method=inmemo,lr")


def test_among_several_settings_the_one_with_the_fewest_other_tags_is_meant(tmp_path):
    # the full method and its ablation variant: the variant adds a key
    _run(tmp_path, "full", 0, [1, 1, 0, 0], method="dual_prompt", **{"data.batch_size": 4})
    _run(tmp_path, "var", 0, [1, 0, 0, 0], method="dual_prompt", **{"data.batch_size": 4, "method.caa": False})
    _run(tmp_path, "coop", 0, [0, 0, 0, 0], method="coop_retrieval")
    r = compare.compare(tmp_path, "method=dual_prompt", "method=coop_retrieval", metric="miou")
    assert r["a"] == "data.batch_size=4, method=dual_prompt" and r["diff"] == pytest.approx(0.5)
    r = compare.compare(tmp_path, "method=dual_prompt", "method=dual_prompt,caa=false", metric="miou")
    assert r["diff"] == pytest.approx(0.25)
    _run(tmp_path, "tvp", 0, [1, 1, 1, 0], method="tvp", **{"method.transfer_targets": ["zoo_clip"],
                                                          "method.tse_backbone": None})
    r = compare.compare(tmp_path, "method=tvp,transfer_targets=[zoo_clip],tse_backbone=null",
                        "method=coop_retrieval", metric="miou")
    assert r["diff"] == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="no completed run"):  # a bool is not the text "0"
        compare.compare(tmp_path, "method=dual_prompt,caa=0", "method=coop_retrieval", metric="miou")


def test_a_demo_claim_that_would_merge_two_settings_is_not_measurable(tmp_path):
    # before, any run whose tags contained the claim's was pooled: two learning rates as one "seed set"
    _grid(tmp_path)
    claim = demo.Claim("icl", "p", {"method": "inmemo"}, {"method": "no_prompt"}, "test/miou")
    r = demo.check_claim(claim, tmp_path)
    assert r["verdict"] == "not measurable" and "2 settings" in r["why"]


def test_cli_prints_the_table_and_bad_input_exits_2_naming_it(tmp_path, capsys):
    _grid(tmp_path)
    other = tmp_path.parent / f"{tmp_path.name}_b"
    _run(other, "np", 0, [0.4, 0.4, 0.4, 0.4], method="no_prompt")
    assert main(["compare", str(tmp_path), "method=inmemo,lr=40", "method=no_prompt", "--b-runs-dir", str(other)]) == 0
    out = capsys.readouterr().out
    assert "A − B = +25.00" in out and "test/miou" in out and "| B: method=no_prompt | 40.00 |" in out
    assert main(["compare", str(tmp_path), "method=inmemo", "method=no_prompt"]) == 2
    err = capsys.readouterr().err
    assert "A={'method': 'inmemo'} names 2 settings" in err
    assert main(["compare", str(tmp_path / "nope"), "method=a", "method=b"]) == 2
    assert "no such folder" in capsys.readouterr().err
