"""Per-item test scores (Task.record_items / take_items, test_items.json): the mean of each metric's
per-item scores is the metric, items are named by their dataset index, and runs write them."""

import json

import pytest
import torch

from prompttune.config import repo_root


def test_classification_items_are_per_image_correctness():
    from prompttune.tasks.classification import ClassificationTask

    t = ClassificationTask(info={"num_classes": 3})
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    t.update({"logits": logits}, {"label": torch.tensor([0, 2, 2, 1]), "index": torch.tensor([5, 6, 7, 8])}, "test")
    acc = t.compute("test")["acc"]
    items = t.take_items("test")
    assert items["scores"]["acc"] == [1.0, 0.0, 1.0, 0.0] and items["index"] == [5, 6, 7, 8]
    assert sum(items["scores"]["acc"]) / 4 == pytest.approx(acc)
    assert t.take_items("test") is None  # taken: the next epoch starts empty


def test_retrieval_items_average_to_the_recalls_and_rsum():
    from prompttune.tasks.retrieval import RetrievalTask, per_item_recalls, retrieval_metrics

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    cid = torch.arange(30)
    cid[3] = 4  # a duplicate caption: two correct items for those queries
    items = per_item_recalls(img, txt, cid)
    ref = retrieval_metrics(img, txt, torch.zeros(30, 0, 8), torch.zeros(30, dtype=torch.long),
                            torch.zeros(30, 0, dtype=torch.long), cid)
    for k in ("i2t/R@1", "i2t/R@5", "t2i/R@10", "rsum"):
        assert float(items[k].mean()) == pytest.approx(ref[k]), k
    task = RetrievalTask()
    batch = {"index": torch.arange(30).flip(0), "caption_id": cid.flip(0)}
    task.update({"image_features": img.flip(0), "text_features": txt.flip(0)}, batch, "test")
    m = task.compute("test")
    got = task.take_items("test")
    assert got["index"] == list(range(30))  # sorted by item, whatever the evaluation order
    assert sum(got["scores"]["rsum"]) / 30 == pytest.approx(m["rsum"])


def test_caption_and_vqa_items_average_to_the_metric():
    from prompttune.tasks.captioning import CaptioningTask, cider_d, cider_d_items
    from prompttune.tasks.vqa import VQATask

    preds = ["a red disc", "a blue square", "two green crosses"]
    refs = [["a red disc", "a red striped disc"], ["a blue plain square"], ["a cyan triangle"]]
    items = cider_d_items(preds, refs)
    assert len(items) == 3 and sum(items) / 3 == pytest.approx(cider_d(preds, refs))
    assert items[0] > items[1] > items[2] == 0.0
    t = CaptioningTask(tokenizer="python")
    t.update({"predictions": preds}, {"references": refs}, "test")
    assert t.compute("test")["cider"] == pytest.approx(sum(items) / 3)
    assert t.take_items("test")["scores"]["cider"] == pytest.approx(items)
    v = VQATask()
    v.update({"predictions": ["2", "red"]}, {"references": [["2"] * 10, ["blue"] * 7 + ["red"] * 3]}, "test")
    acc = v.compute("test")["vqa_acc"]
    got = v.take_items("test")["scores"]["vqa_acc"]
    assert got[0] == 1.0 and 0 < got[1] < 1 and sum(got) / 2 == pytest.approx(acc)


def test_icl_items_are_per_episode_iou():
    from prompttune.tasks.icl_segmentation import ICLSegmentationTask

    t = ICLSegmentationTask()
    true = torch.zeros(2, 3, 8, 8)
    true[:, :, :4] = 1.0  # white foreground, top half
    pred = true.clone()
    pred[1] = 0.0
    t.update({"pred_cell": pred, "true_cell": true}, {"index": torch.tensor([0, 1])}, "test")
    m = t.compute("test")
    items = t.take_items("test")["scores"]
    assert items["miou"] == [1.0, 0.0] and m["miou"] == pytest.approx(0.5)


def test_a_run_writes_test_items_json(tmp_path):
    from prompttune.config import compose
    from prompttune.runs import fit

    cfg = compose(repo_root() / "experiments" / "smoke.yaml", ["method=linear_probe", f"run_dir={tmp_path}"])
    res = fit(cfg)
    items = json.loads((tmp_path / "test_items.json").read_text())
    assert res["test_items"] == "test_items.json" and items["split"] == "test"
    acc = items["scores"]["acc"]
    assert len(acc) == items["n"] and set(acc) <= {0.0, 1.0}
    assert sum(acc) / len(acc) == pytest.approx(res["metrics"]["test/acc"], abs=1e-6)
    assert len(set(items["index"])) == len(acc)
