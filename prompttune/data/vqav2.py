"""VQAv2 (questions + annotations JSON over COCO images), and the synthetic world's writer.

Layout (the official release)::

    root/v2_OpenEnded_mscoco_train2014_questions.json   {"questions": [{"image_id", "question", "question_id"}]}
    root/v2_mscoco_train2014_annotations.json           {"annotations": [{"question_id", "image_id",
                                                           "multiple_choice_answer", "answers": [{"answer"}] x 10}]}
    root/train2014/COCO_train2014_000000000042.jpg      (and the same for val2014)

Protocol: train2014 trains; val2014 is the test split (VQAv2's test-dev answers are held by
the evaluation server). The training target is ``multiple_choice_answer`` (the most common
human answer); evaluation uses all ten answers with the VQA accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import DataError, read_json
from prompttune.data.coco_captions import InContextDataModule
from prompttune.registry import DATASETS, SYNTHETIC

VQA_PROMPT = "Question: {} Answer:"


def vqa_prompt(question: str, template: str = VQA_PROMPT) -> str:
    return template.format(question)


def _load(path: Path, key: str) -> list[dict]:
    data = read_json(path, f"VQAv2 file not found: {path}")
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a {key!r} list")
    return data[key]


def read_vqav2(root: str | Path, split: str, image_pattern: str = "{split}2014/COCO_{split}2014_{image_id:012d}.jpg"
               ) -> list[dict[str, Any]]:
    """Questions of ``split`` (train | val) joined with their annotations: {path, question, answer, answers}."""
    root = Path(root)
    qs = _load(root / f"v2_OpenEnded_mscoco_{split}2014_questions.json", "questions")
    anns = _load(root / f"v2_mscoco_{split}2014_annotations.json", "annotations")
    by_q = {}
    for i, a in enumerate(anns):
        for key in ("question_id", "answers", "multiple_choice_answer"):
            if key not in a:
                raise DataError(f"{root}: annotations[{i}] of {split} has no {key!r}")
        by_q[a["question_id"]] = a
    out = []
    for i, q in enumerate(qs):
        for key in ("question_id", "image_id", "question"):
            if key not in q:
                raise DataError(f"{root}: questions[{i}] of {split} has no {key!r}")
        a = by_q.get(q["question_id"])
        if a is None:
            raise DataError(f"{root}: question {q['question_id']} of {split} has no annotation")
        out.append({"path": str(root / image_pattern.format(split=split, image_id=q["image_id"])),
                    "question": q["question"], "answer": a["multiple_choice_answer"],
                    "answers": [x["answer"] for x in a["answers"]]})
    return out


@DATASETS.register("vqav2")
class VQAv2DataModule(InContextDataModule):
    kind = "vqa"

    def __init__(self, root: str, image_pattern: str = "{split}2014/COCO_{split}2014_{image_id:012d}.jpg",
                 prompt: str | list[str] = VQA_PROMPT, **kw: Any):
        super().__init__(root, prompt=prompt, **kw)
        self.image_pattern = image_pattern
        for p in [self.prompt] if isinstance(self.prompt, str) else self.prompt:
            if "{}" not in p:
                raise DataError(f"data.prompt must contain '{{}}' where the question goes, got {p!r}")

    def _prompt(self, question: str) -> str | list[str]:
        if isinstance(self.prompt, str):
            return vqa_prompt(question, self.prompt)
        return [vqa_prompt(question, t) for t in self.prompt]

    def check(self) -> None:
        self.ensure()
        self.rows = {}
        for split, src in (("train", "train"), ("test", "val")):
            self.rows[split] = [{"paths": [r["path"]], "prompt": self._prompt(r["question"]),
                                 "target": r["answer"], "refs": r["answers"]}
                                for r in read_vqav2(self.root, src, self.image_pattern)]
        self.check_rows()


def world_question(objs, rng: np.random.Generator, counting: bool) -> tuple[str, list[str]]:
    """A question about a scene and its ten human answers."""
    o = objs[0]
    if counting:
        n = len(objs)
        # annotators answer with digits or words; the VQA normalisation maps both to digits
        return "how many shapes are there ?", [str(n)] * 6 + [("zero", "one", "two", "three", "four")[n]] * 4
    kind = rng.integers(4)
    q, a = [("what color is the object ?", o.color), ("what shape is it ?", o.category),
            ("what pattern does the shape have ?", o.subcategory), ("what size is the object ?", o.size)][kind]
    return q, [a] * 10


@SYNTHETIC.register("vqav2")
def write_vqav2(root: Path, n_train: int = 64, n_val: int = 32, n_test: int = 0, side: int = 32, seed: int = 0,
                style: str = "vqa", background: str = "plain", p_counting: float = 0.2) -> None:
    """Synthetic scenes with one question each, in VQAv2's questions/annotations JSON.
    (``n_test`` is accepted for symmetry; VQAv2 evaluates on val2014.)"""
    from prompttune.data.world import render, sample_scene, save_png

    root = Path(root)
    rng = np.random.default_rng(seed)
    qid = 0
    for split, n in (("train", n_train), ("val", n_val + n_test)):
        (root / f"{split}2014").mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for i in range(n):
            counting = rng.random() < p_counting
            objs = sample_scene(rng, n_objects=int(rng.integers(1, 4)) if counting else 1)
            img, _ = render(objs, side, rng, background)
            image_id = i + 1
            save_png(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.png", img)
            q, answers = world_question(objs, rng, counting and len(objs) > 0)
            qid += 1
            questions.append({"image_id": image_id, "question": q, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": image_id, "multiple_choice_answer": answers[0],
                                "answer_type": "number" if counting else "other",
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j, a in enumerate(answers)]})
        (root / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(
            json.dumps({"task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
        (root / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
