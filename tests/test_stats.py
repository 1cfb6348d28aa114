"""prompttune.stats: paired differences, bootstrap intervals, verdicts, per-item records."""

import json
import math

import numpy as np
import pytest

from prompttune import stats


def _naive_hierarchical(d, n_boot, seed):
    """A loop transcription of the two-level bootstrap (seeds, then items) with the same draws."""
    rng = np.random.default_rng(seed)
    s, n = d.shape
    out = []
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    picks = rng.integers(0, s, size=(n_boot, s)) if s > 1 else None
    for b in range(n_boot):
        per_seed = [(counts[b] * d[k]).sum() / n for k in range(s)]
        out.append(np.mean([per_seed[j] for j in picks[b]]) if picks is not None else np.mean(per_seed))
    return np.percentile(out, [2.5, 97.5])


def test_difference_and_seed_interval_match_hand_computed_values():
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], float)
    b = np.array([[0, 1, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1]], float)
    r = stats.paired_difference(a, b, n_boot=200)
    per_seed = [0.25, 0.25, 0.5]
    assert r["diff"] == pytest.approx(np.mean(per_seed)) and r["per_seed"] == pytest.approx(per_seed)
    half = 4.303 * np.std(per_seed, ddof=1) / math.sqrt(3)
    assert r["ci_seeds"] == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half))
    assert (r["n_seeds"], r["n_items"]) == (3, 4)


def test_hierarchical_bootstrap_matches_a_loop_transcription():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, size=(3, 50))
    r = stats.paired_difference(d, np.zeros_like(d), n_boot=300, seed=7)
    assert r["ci"] == pytest.approx(tuple(_naive_hierarchical(d, 300, 7)))


def test_a_real_effect_is_detected_and_no_effect_is_not():
    rng = np.random.default_rng(0)
    base = rng.random((3, 400))
    better = base + 0.05 + rng.normal(0, 0.02, base.shape)
    r = stats.paired_difference(better, base)
    assert r["ci"][0] > 0 and stats.verdict("+", r["ci"]) == "holds"
    assert stats.verdict("-", r["ci"]) == "reversed"
    same = stats.paired_difference(base + rng.normal(0, 0.1, base.shape), base)
    assert same["ci"][0] < 0 < same["ci"][1] and stats.verdict("+", same["ci"]) == "inconclusive"


def test_seed_spread_widens_the_interval_beyond_item_sampling():
    """A method whose gain flips sign across seeds is not a win, however many items."""
    rng = np.random.default_rng(0)
    base = rng.random((3, 2000))
    a = base + np.array([[0.05], [-0.04], [0.06]])
    r = stats.paired_difference(a, base)
    assert r["ci_items"][0] > 0  # items alone would call it
    assert r["ci"][0] <= 0 <= r["ci"][1] or r["ci"][0] < r["ci_items"][0]
    assert r["ci_seeds"][0] < 0 < r["ci_seeds"][1]


def test_frozen_method_pairs_with_every_seed_and_shows_its_sampling_interval():
    frozen = np.array([1, 0, 1, 1, 0, 1, 0, 1] * 25, float)
    tuned = np.stack([frozen, frozen, frozen])
    tuned[:, :40] = 1
    r = stats.paired_difference(tuned, frozen)
    assert r["n_seeds"] == 3 and r["diff"] == pytest.approx((1 - frozen[:40]).sum() / 200)
    m = stats.mean_ci(frozen)
    assert m["mean"] == pytest.approx(0.625) and m["ci"][0] < 0.625 < m["ci"][1]
    se = math.sqrt(0.625 * 0.375 / 200)
    assert m["ci"][1] - m["ci"][0] == pytest.approx(2 * 1.96 * se, rel=0.2)  # not ± 0.00


@pytest.mark.parametrize("a,b,match", [
    (np.zeros((2, 5)), np.zeros((2, 6)), "different test sets"),
    (np.zeros((2, 5)), np.zeros((3, 5)), "seeds cannot be paired"),
    (np.array([[np.nan, 1.0]]), np.zeros((1, 2)), "non-finite"),
    (np.zeros((1, 0)), np.zeros((1, 0)), "per-item scores"),
])
def test_bad_inputs_are_rejected(a, b, match):
    with pytest.raises(ValueError, match=match):
        stats.paired_difference(a, b)


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        stats.verdict(">", (0.1, 0.2))


def test_aligned_scores_pairs_items_by_index_whatever_the_order(tmp_path):
    recs = [{"index": [2, 0, 1], "scores": {"acc": [0.2, 0.0, 0.1]}},
            {"index": [0, 1, 2], "scores": {"acc": [1.0, 1.1, 1.2]}}]
    m = stats.aligned_scores(recs, "test/acc")
    assert m.tolist() == [[0.0, 0.1, 0.2], [1.0, 1.1, 1.2]]
    with pytest.raises(ValueError, match="different test items"):
        stats.aligned_scores([recs[0], {"index": [0, 1, 5], "scores": {"acc": [0, 0, 0]}}], "acc")
    with pytest.raises(KeyError, match="miou"):
        stats.aligned_scores(recs, "miou")
    (tmp_path / "test_items.json").write_text(json.dumps({"n": 3, **recs[0]}))
    assert stats.read_items(tmp_path)["scores"]["acc"] == [0.2, 0.0, 0.1]
    assert stats.read_items(tmp_path / "nope") is None
