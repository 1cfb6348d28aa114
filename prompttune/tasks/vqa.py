"""VQA: LM loss on the answer; VQA accuracy of the generated answer against ten human answers.

Accuracy (Antol et al. 2015 / the official ``vqaEval.py``): for each of the ten answers,
``min(1, #other nine answers equal to the prediction / 3)``, averaged over the ten, after the
official normalisation (lower case, punctuation removed, number words to digits, articles
dropped, common contractions restored). Averaged over questions.
"""

from __future__ import annotations

import re

from prompttune.registry import TASKS
from prompttune.tasks.captioning import GenerationTask, gather_lists

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "im": "i'm", "ive": "i've", "thats": "that's", "whats": "what's"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:]")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_answer(ans: str) -> str:
    ans = ans.replace("\n", " ").replace("\t", " ").strip().lower()
    ans = _PUNCT.sub("", ans)
    ans = _PERIOD.sub("", ans)
    words = []
    for w in ans.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"VQA accuracy needs a non-empty list of human answers, got {answers!r}")
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
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
        return {"vqa_acc": sum(vqa_accuracy(p, a) for p, a in zip(preds, refs)) / len(preds)}
