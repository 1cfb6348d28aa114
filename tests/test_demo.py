"""The demo's verdicts: claims checked on run records (result.json + test_items.json), no training."""

import json

import numpy as np
import pytest

from prompttune import demo, stats


def _run(root, name, method, seed, scores, metric="acc", **tags):
    d = root / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"status": "completed", "method": method, "seed": seed,
                                               "tags": {"method": method, **tags}, "metrics": {}}))
    n = len(scores)
    (d / "test_items.json").write_text(json.dumps({"n": n, "index": list(range(n))[::-1],
                                                   "scores": {metric: list(scores)[::-1]}}))


def test_claims_cover_the_five_papers_and_name_existing_sections():
    papers = " ".join(c.paper for c in demo.CLAIMS)
    for p in ("DCAR", "SPT", "InMeMo", "E-InMeMo", "MMICT", "TVP"):
        assert p in papers
    for c in demo.CLAIMS:
        assert c.section in demo.sections(), c
        assert c.direction in ("+", "-")


def test_a_clear_win_holds_and_a_frozen_baseline_pairs_with_every_seed(tmp_path):
    rng = np.random.default_rng(0)
    sec = tmp_path / "icl"
    base = rng.random(300)
    _run(sec, "np", "no_prompt", 0, base, "miou")
    for s in range(3):
        _run(sec, f"in{s}", "inmemo", s, np.clip(base + 0.1 + rng.normal(0, 0.02, 300), 0, 1), "miou")
        _run(sec, f"e{s}", "e_inmemo", s, np.clip(base + 0.1 + rng.normal(0, 0.02, 300), 0, 1), "miou")
    claim = next(c for c in demo.CLAIMS if c.a == {"method": "inmemo"})
    r = demo.check_claim(claim, sec)
    assert r["verdict"] == "holds" and r["n_seeds"] == 3 and r["n_items"] == 300
    assert r["diff"] == pytest.approx(0.1, abs=0.01)
    e = demo.check_claim(next(c for c in demo.CLAIMS if c.a == {"method": "e_inmemo"}), sec)
    assert e["verdict"] == "inconclusive"  # no real difference between the two
    md, results = demo.section_verdicts("icl", sec)
    assert "holds" in md and "inconclusive" in md and "± 0.00" not in md
    rows = demo.method_rows(sec, "test/miou")
    frozen = next(r for r in rows if "no_prompt" in r["setting"])
    assert frozen["n_seeds"] == 1 and frozen["ci"][1] - frozen["ci"][0] > 0.02  # its sampling interval


def test_missing_runs_or_items_give_a_stated_reason_not_a_crash(tmp_path):
    sec = tmp_path / "vpt"
    _run(sec, "v", "vpt_deep", 0, [1, 0, 1])
    claim = next(c for c in demo.CLAIMS if c.section == "vpt")
    assert demo.check_claim(claim, sec)["verdict"] == "not run"
    _run(sec, "s", "spt_deep", 0, [1, 1, 1, 1])
    r = demo.check_claim(claim, sec)
    assert r["verdict"] == "not measurable" and "different" in r["why"]
    (sec / "s" / "test_items.json").unlink()
    assert "no test_items.json" in demo.check_claim(claim, sec)["why"]


def test_shared_tags_select_the_shot_count(tmp_path):
    sec = tmp_path / "clip"
    for shots, gain in ((1, -0.2), (16, 0.3)):
        base = np.array([0, 1] * 100, float)
        for s in range(2):
            _run(sec, f"z{shots}{s}", "zero_shot", s, base, **{"data.shots": shots})
            better = base.copy()
            better[::2] = 1.0 if gain > 0 else 0.0
            if gain < 0:
                better[1::4] = 0.0
            _run(sec, f"c{shots}{s}", "coop", s, better, **{"data.shots": shots})
    r = demo.check_claim(next(c for c in demo.CLAIMS if c.section == "clip"), sec)
    assert r["verdict"] == "holds" and r["diff"] == pytest.approx(0.5)


def test_verdicts_of_reads_a_whole_demo_dir(tmp_path):
    res = demo.verdicts_of(tmp_path)
    assert len(res) == len(demo.CLAIMS) and {r["verdict"] for r in res} == {"not run"}
    assert "not run" in demo.verdict_markdown(res)
    assert stats.verdict("+", (0.01, 0.02)) == "holds"


@pytest.mark.slow
def test_claim_on_real_runs_pairs_their_test_items(tmp_path):
    """Four smoke runs (untrained zoo CLIP): the verdict machinery reads what runs really write."""
    from prompttune.config import compose, repo_root
    from prompttune.runs import fit

    sec = tmp_path / "clip"
    for method in ("zero_shot", "coop"):
        for seed in (0, 1):
            cfg = compose(repo_root() / "experiments" / "smoke.yaml",
                          [f"method={method}", f"seed={seed}", f"run_dir={sec / f'{method}{seed}'}",
                           "data.shots=16", f"tags={{method: {method}, data.shots: 16}}"])
            fit(cfg)
    r = demo.check_claim(next(c for c in demo.CLAIMS if c.section == "clip"), sec)
    assert r["verdict"] in ("holds", "inconclusive", "reversed") and r["n_seeds"] == 2
    assert r["n_items"] == len(stats.read_items(sec / "coop0")["scores"]["acc"])
    assert r["ci"][0] <= r["diff"] <= r["ci"][1]


@pytest.mark.parametrize("metric,scale", [("test/acc", 100), ("test/transfer_acc", 100), ("test/miou", 100),
                                          ("test/i2t/R@1", 100), ("test/rsum", 1), ("test/cider", 1)])
def test_metrics_in_0_1_are_shown_in_percent(metric, scale):
    assert demo.scale_of(metric) == scale


def test_a_sections_summary_is_kept_beside_its_runs_and_redone_when_a_run_is_newer(tmp_path):
    """The section's child leaves summary.json; the demo reads it, unless a run's record is newer
    (a run finished later, e.g. by a resumed sweep) or the file is unreadable."""
    import os

    rng = np.random.default_rng(1)
    sec = tmp_path / "icl"
    base = rng.random(200)
    _run(sec, "np", "no_prompt", 0, base, "miou")
    _run(sec, "in0", "inmemo", 0, np.clip(base + 0.2, 0, 1), "miou")
    first = demo.section_summary("icl", sec, fresh=True)
    assert (sec / "summary.json").is_file()
    claim = next(r for r in first["claims"] if "inmemo > no_prompt" in r["claim"])
    assert claim["verdict"] == "holds" and "holds" in first["verdicts_md"]
    (sec / "summary.json").write_text(json.dumps({**first, "verdicts_md": "from the file"}))
    assert demo.section_summary("icl", sec)["verdicts_md"] == "from the file"  # read, not recomputed
    _run(sec, "in1", "inmemo", 1, np.clip(base - 0.2, 0, 1), "miou")  # a later run changes the verdict
    t = (sec / "summary.json").stat().st_mtime
    os.utime(sec / "in1" / "result.json", (t + 5, t + 5))
    again = demo.section_summary("icl", sec)
    assert again["verdicts_md"] != "from the file"
    assert next(r for r in again["claims"] if "inmemo > no_prompt" in r["claim"])["n_seeds"] == 2
    (sec / "summary.json").write_text("{not json")
    assert demo.section_summary("icl", sec)["claims"] == again["claims"]
