"""CIDEr-D, BLEU-4 and VQA accuracy against values computed by hand (worked out in comments)."""

import math

import pytest

from prompttune.tasks.captioning import CaptioningTask, bleu, caption_tokens, cider_d
from prompttune.tasks.vqa import VQATask, normalize_answer, vqa_accuracy


def test_bleu4_modified_precisions_without_brevity_penalty():
    # hyp 6 words, ref 5: p1 = 5/6, p2 = 4/5, p3 = 3/4, p4 = 2/3; hyp longer -> BP = 1
    got = bleu(["a large red striped disc moves"], [["a large red striped disc"]])
    assert got == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, rel=1e-6)  # (1/3)^(1/4) = 0.7598


def test_bleu4_brevity_penalty_uses_closest_reference():
    # hyp "a large red striped" (4 words), all n-gram precisions 1; refs of length 3 and 6:
    # closest length is 3 (|3-4| = 1 < |6-4| = 2) -> no penalty, hyp longer than that
    got = bleu(["a large red striped"], [["a large red", "a large red striped square disc"]])
    assert got == pytest.approx(1.0, rel=1e-6)
    # with only the 5-word reference: BP = exp(1 - 5/4)
    got = bleu(["a large red striped"], [["a large red striped disc"]])
    assert got == pytest.approx(math.exp(1 - 5 / 4), rel=1e-6)


def test_bleu_clips_repeated_words_and_ignores_case_and_punctuation():
    # unigram precision of "the the the the" against "the cat" is clipped to 1/4
    # (hyp longer than the reference: no brevity penalty)
    assert bleu(["the the the the"], [["the cat"]], n=1) == pytest.approx(0.25, rel=1e-6)
    assert caption_tokens("A Red, disc.") == ["a", "red", "disc"]


def test_cider_d_hand_computed():
    # two images, one reference each; IDF weight log(2) - log(df): "a" occurs in both -> 0.
    # image 1: "a red square" vs "a red disc": unigram cos 0.5, bigram 0.5 ("red square" has df 0
    #   -> weight log 2), trigram 0, no 4-grams; equal bigram lengths -> (0.5 + 0.5) / 4 * 10 = 2.5
    # image 2: exact match -> (1 + 1 + 1 + 0) / 4 * 10 = 7.5; mean 5.0
    refs = [["a red disc"], ["a blue square"]]
    assert cider_d(["a red square", "a blue square"], refs) == pytest.approx(5.0, rel=1e-6)
    assert cider_d(["a red disc", "a blue square"], refs) == pytest.approx(7.5, rel=1e-6)


def test_cider_d_length_penalty_and_single_image():
    refs = [["a red disc"], ["a blue square"]]
    # one extra word: unigrams a:0, red:L, disc:L, big:L -> cos = 2L^2/(sqrt(3)L * sqrt(2)L) = 2/sqrt(6);
    # bigrams (a red, red disc, disc big vs a red, red disc) all weight L -> 2/sqrt(6); trigrams
    # (a red disc, red disc big vs a red disc) -> 1/sqrt(2); bigram lengths 3 vs 2 -> exp(-1/72)
    s1 = (2 / math.sqrt(6) * 2 + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    got = cider_d(["a red disc big", "a blue square"], refs)
    assert got == pytest.approx((s1 + 7.5) / 2, rel=1e-6)
    # with a single image every n-gram has IDF log(1) - log(1) = 0: CIDEr-D is 0 by definition
    assert cider_d(["a red disc"], [["a red disc"]]) == 0.0


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="one reference list per prediction"):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        bleu(["a"], ["a red disc"])


def test_vqa_accuracy_hand_computed():
    # 2 of 10 annotators said "red": leaving out a "red" one leaves 1 match (1/3), leaving out a
    # "blue" one leaves 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    answers = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("red", answers) == pytest.approx(0.6)
    assert vqa_accuracy("The Red.", answers) == pytest.approx(0.6)  # normalised
    assert vqa_accuracy("blue", answers) == pytest.approx(1.0)
    assert vqa_accuracy("green", answers) == 0.0
    # number words and digits are the same answer after normalisation
    assert vqa_accuracy("two", ["2"] * 6 + ["two"] * 4) == pytest.approx(1.0)
    assert normalize_answer("  A Dog's  toy!") == "dog's toy"
    with pytest.raises(ValueError, match="non-empty list of human answers"):
        vqa_accuracy("red", "red")


def test_tasks_accumulate_and_compute():
    t = CaptioningTask(info={"kind": "caption"})
    t.update({"predictions": ["a red square"]}, {"references": [["a red disc"]]}, "test")
    t.update({"predictions": ["a blue square"]}, {"references": [["a blue square"]]}, "test")
    m = t.compute("test")
    assert m["cider"] == pytest.approx(5.0) and 0 < m["bleu4"] < 1
    t.reset("test")
    assert t.compute("test") == {}
    with pytest.raises(ValueError, match="2 predictions for a batch of 1"):
        t.update({"predictions": ["a", "b"]}, {"references": [["a"]]}, "test")
    with pytest.raises(KeyError, match="outputs\\['loss'\\]"):
        t.loss({"predictions": []}, {})
    v = VQATask(info={"kind": "vqa"})
    v.update({"predictions": ["red", "green"]}, {"references": [["red"] * 2 + ["blue"] * 8, ["green"] * 10]}, "val")
    assert v.compute("val")["vqa_acc"] == pytest.approx((0.6 + 1.0) / 2)
