"""Caption metrics after the PTB tokenizer: the Python re-implementation against pinned outputs of
pycocoevalcap's Java PTBTokenizer, and (slow; needs pycocoevalcap + Java) CIDEr-D / BLEU equal to
pycocoevalcap's own scorers on a punctuation-heavy corpus."""

import pytest

from prompttune.tasks.captioning import (CaptioningTask, bleu, caption_tokens, cider_d, java_ptb_available,
                                         ptb_tokenize_py, tokenize_captions)

# (caption, pycocoevalcap PTBTokenizer output), recorded with pycocoevalcap 1.2 (CoreNLP 3.4.1)
PINNED = [
    ("A man in a t-shirt.", "a man in a t-shirt"),
    ("The dog's toy is 2.5 m long!", "the dog 's toy is 2.5 m long"),
    ('They\'re eating "pizza" (with cheese), aren\'t they?', "they 're eating pizza -lrb- with cheese -rrb- are n't they"),
    ("A woman can't find her cat; it's on the sofa...", "a woman ca n't find her cat it 's on the sofa"),
    ("Mr. Smith's U.S.A. trip: 3:30 pm", "mr. smith 's u.s.a. trip 3:30 pm"),
    ("A $5 bill & 50% off -- wow", "a $ 5 bill & 50 % off wow"),
    ("Two men play frisbee/catch in the park.", "two men play frisbee/catch in the park"),
    ("it's 10,000 feet up", "it 's 10,000 feet up"),
    ("A man's hat, a woman's bag.", "a man 's hat a woman 's bag"),
    ("He said 'hello' to me", "he said hello to me"),
    ("cats' toys", "cats toys"),
    ("e-mail me @ home #1", "e-mail me @ home # 1"),
    ("I'd go; we'll see; you've been", "i 'd go we 'll see you 've been"),
    ("A 3-year-old boy", "a 3-year-old boy"),
    ("an `odd' quote", "an odd quote"),
    ("{curly} [square]", "-lcb- curly -rcb- -lsb- square -rsb-"),
    ("wait... what?!", "wait what ?!"),
    ("rock'n'roll", "rock 'n' roll"),
    ("o'clock", "o'clock"),
    ("cannot", "can not"),
    ("gonna", "gon na"),
    ("end.", "end"),
    ("A.B. c. D.", "a.b. c. d."),
    ("3.14", "3.14"),
    ("I'm", "i 'm"),
    ("'Tis", "'t is"),
    ("y'all", "y' all"),
]

# a punctuation-heavy caption corpus: (prediction, references)
CORPUS = [
    ("a man in a t-shirt rides a skate-board.", ["A man in a T-shirt riding a skateboard.", "a guy, in a t-shirt, skates",
                                                  "Man's skateboard trick -- on a ramp!"]),
    ("the dog's toy is 2.5 m long", ["A dog's toy; it is 2.5 m long.", "the dog has a long toy", "A toy (for dogs)."]),
    ("two women aren't eating pizza", ["Two women eating \"pizza\" at a table.", "women aren't eating.",
                                       "2 women, one pizza..."]),
    ("a cat on a sofa", ["A cat sleeps on the sofa.", "a cat's nap: on a sofa", "The cat -- on a red sofa!"]),
    ("a 3-year-old boy plays", ["A 3-year-old boy plays with a ball.", "the boy, 3, plays", "a boy's game @ home"]),
    ("people at 10,000 feet", ["People hiking at 10,000 feet.", "hikers at 3:30 pm", "a group of people (hiking)"]),
]


@pytest.mark.parametrize("caption,expected", PINNED)
def test_python_ptb_matches_pinned_java_output(caption, expected):
    assert ptb_tokenize_py(caption) == expected.split()


def test_tokenizers_differ_as_documented():
    # the old 'simple' tokenisation splits what PTB keeps whole and keeps what it drops
    assert caption_tokens("a t-shirt, 2.5 m") == ["a", "t", "shirt", "2", "5", "m"]
    assert ptb_tokenize_py("a t-shirt, 2.5 m") == ["a", "t-shirt", "2.5", "m"]
    preds, refs = [p for p, _ in CORPUS], [r for _, r in CORPUS]
    assert cider_d(preds, refs, tokenizer="simple") != pytest.approx(cider_d(preds, refs, tokenizer="python"))
    with pytest.raises(ValueError, match="task.tokenizer must be one of auto, ptb, python, simple"):
        CaptioningTask(tokenizer="nltk")


@pytest.mark.slow
@pytest.mark.skipif(not java_ptb_available(), reason="needs pycocoevalcap and java")
def test_scores_equal_pycocoevalcap_on_a_punctuation_heavy_corpus():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": c} for c in refs] for i, (_, refs) in enumerate(CORPUS)}
    res = {i: [{"caption": p}] for i, (p, _) in enumerate(CORPUS)}
    tok = PTBTokenizer()
    gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    official_cider, _ = Cider().compute_score(gts_t, res_t)
    official_bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    preds, refs = [p for p, _ in CORPUS], [r for _, r in CORPUS]
    for name in ("ptb", "python"):  # the Java tokenizer, and the re-implementation (equal on this corpus)
        assert cider_d(preds, refs, tokenizer=name) == pytest.approx(official_cider, rel=1e-9)
        assert bleu(preds, refs, 4, tokenizer=name) == pytest.approx(official_bleu[3], rel=1e-9)
        assert bleu(preds, refs, 1, tokenizer=name) == pytest.approx(official_bleu[0], rel=1e-9)
    flat = preds + [r for rs in refs for r in rs]
    assert tokenize_captions(flat, "python") == tokenize_captions(flat, "ptb")
    task = CaptioningTask(tokenizer="ptb")
    task.update({"predictions": preds}, {"references": refs}, "test")
    assert task.compute("test")["cider"] == pytest.approx(official_cider, rel=1e-9)
    # the old tokenisation scores these captions differently
    assert cider_d(preds, refs, tokenizer="simple") != pytest.approx(official_cider, rel=1e-3)
