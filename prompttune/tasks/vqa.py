"""VQA: LM loss on the answer; VQA accuracy of the generated answer against ten human answers.

Accuracy is the official evaluator's (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/
vqaEval.py``, ``VQAEval.evaluate``), rule for rule:

* answers and prediction: ``\\n`` and ``\\t`` become spaces, then ``strip()`` (vqaEval.py:88-94);
* **only when the ten human answers are not all identical** (vqaEval.py:98), each of them and the
  prediction go through ``processPunctuation`` then ``processDigitArticle`` (vqaEval.py:99-103).
  With ten identical answers nothing is normalised, not even case: "two" against ten "2" scores 0;
* ``processPunctuation`` (vqaEval.py:130-140): each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
  is *deleted* when it is followed or preceded by a space in the original text, or when the
  text has a digit-comma-digit (``1,000``); otherwise it is *replaced by a space* ("t-shirt" ->
  "t shirt"). Then periods not followed by a digit are deleted, by the official regular
  expression ``(?!<=\\d)(\\.)(?!\\d)`` (whose look-behind is mistyped as a look-ahead, so
  "2." loses its period too), passing ``re.UNICODE`` as ``re.sub``'s *count*: at most 32
  periods go. Both quirks are kept;
* ``processDigitArticle`` (vqaEval.py:142-155): lower case, split on whitespace, number words
  zero..ten and "none" to digits (``manualMap``), articles a/an/the dropped, then the
  contractions table (``dont`` -> ``don't``, ...);
* per question: for each of the ten answers, ``min(1, #matches among the other nine / 3)``,
  averaged over the ten leave-one-out subsets (vqaEval.py:105-112); averaged over questions.

(The official evaluator reports percentages rounded to 2 decimals; here fractions in [0, 1].)
"""

from __future__ import annotations

import re

from prompttune.registry import TASKS
from prompttune.tasks.captioning import GenerationTask, gather_lists

# vqaEval.py:21-42, keys and values as released (capitalised keys such as "Im" never match
# after processDigitArticle's lower(); kept as is)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # vqaEval.py:43-55
ARTICLES = ("a", "an", "the")  # vqaEval.py:56-59
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
         "!")  # vqaEval.py:64-66
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # vqaEval.py:62, as released
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py:63


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE lands in `count` (= 32)


def process_digit_article(text: str) -> str:
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(ans: str) -> str:
    """The official normalisation (applied only when the human answers disagree)."""
    return process_digit_article(process_punctuation(ans))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """Official per-question VQA accuracy in [0, 1] (see the module docstring)."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"VQA accuracy needs a non-empty list of human answers, got {answers!r}")
    gts = [_clean(a) for a in answers]
    p = _clean(pred)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        p = normalize_answer(p)
    accs = []
    for i in range(len(gts)):  # the ten leave-one-out subsets of nine answers
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == p for g in others) / 3.0))
    return sum(accs) / len(accs)


@TASKS.register("vqa")
class VQATask(GenerationTask):
    monitor = "vqa_acc"

    def compute(self, stage):
        preds, refs = gather_lists(self.preds[stage], self.refs[stage])
        if not preds:
            return {}
        items = [vqa_accuracy(p, a) for p, a in zip(preds, refs)]
        if stage == "test":  # per-question accuracy for paired comparisons (prompttune.stats)
            self.record_items(stage, None, replace=True, vqa_acc=items)
        return {"vqa_acc": sum(items) / len(items)}
