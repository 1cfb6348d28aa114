"""Retrieval task: Recall@K both ways and the 1-positive-plus-M-negatives protocol against hand-computed
values and a transcription of the old per-query loops, chunking, and the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from prompttune.tasks.retrieval import (RetrievalTask, one_image_per_class, recall_at_k, recall_at_k_chunked,
                                       retrieval_metrics)


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5],   # correct col 0: rank 0
                           [0.8, 0.2, 0.7],   # correct col 1: two wrong above -> rank 2
                           [0.3, 0.6, 0.1]])  # correct col 2: rank 2
    correct = torch.eye(3, dtype=torch.bool)
    r = recall_at_k(scores, correct, (1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(1.0)}


def test_ties_count_against_the_query():
    scores = torch.zeros(4, 4)  # a model with constant embeddings
    r = recall_at_k(scores, torch.eye(4, dtype=torch.bool), (1, 4))
    assert r[1] == 0.0 and r[4] == 1.0


def test_any_correct_item_counts():
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    correct = torch.tensor([[True, True, False]])  # duplicates of the same caption
    assert recall_at_k(scores, correct, (1,))[1] == 1.0


def test_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.bool), (1,))
    with pytest.raises(ValueError, match="at least one correct"):
        recall_at_k(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool), (1,))


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_protocols_by_hand():
    # 3 images / captions in 2-d; image i is closest to caption i except image 1 (closest to caption 2)
    img = _unit([1, 0], [0.6, 0.8], [0, 1])
    txt = _unit([1, 0.1], [1, 0.5], [0.3, 1])
    cid = torch.tensor([0, 1, 2])
    label = torch.tensor([0, 1, 2])
    # 2 negatives per image, each naming a class (neg_label), one unresolvable (-1)
    neg = torch.stack([_unit([0.9, 0.2], [0, 1]), _unit([0.5, 0.8], [1, 0]), _unit([1, 0], [-1, 0])])
    neg_label = torch.tensor([[1, 2], [2, -1], [0, 1]])
    m = retrieval_metrics(img, txt, neg, label, neg_label, cid, ks=(1, 2))
    # by hand, sim = img @ txt.T = [[.995 .894 .287] [.677 .894 .939] [.100 .447 .958]]
    # i2t: image 1's caption (.894) has .939 above it: rank 1; the others rank 0
    assert m["i2t/R@1"] == pytest.approx(2 / 3) and m["i2t/R@2"] == pytest.approx(1.0)
    # t2i: caption 1's column [.894 .894 .447]: image 0 ties with the correct image 1 and ties count against
    assert m["t2i/R@1"] == pytest.approx(2 / 3) and m["t2i/R@2"] == pytest.approx(1.0)
    # 1-positive-2-negatives i2t: image negatives' scores [[.976 0] [.996 .6] [0 0]]; image 1's positive (.894) loses to .996
    assert m["1pos2neg_i2t/R@1"] == pytest.approx(2 / 3) and m["1pos2neg_i2t/R@2"] == pytest.approx(1.0)
    # 1-positive-2-negatives t2i: caption 0 (.995) vs images 1, 2 (.677, .100); caption 1 (.894) vs image 2 (.447), the -1 dropped;
    # caption 2 (.958) vs images 0, 1 (.287, .939): all hits
    assert m["1pos2neg_t2i/R@1"] == pytest.approx(1.0)
    assert m["rsum"] == pytest.approx(2 * (2 / 3 + 1.0))
    # a swapped-in class whose image beats the caption's own image is a miss
    m2 = retrieval_metrics(img, txt, neg, label, torch.tensor([[1, 2], [2, -1], [1, 1]]), cid, ks=(1,))
    assert m2["1pos2neg_t2i/R@1"] == pytest.approx(1.0)
    txt2 = _unit([1, 0.1], [1, 0.5], [0.6, 0.8])  # caption 2 now matches image 1 (1.0) better than image 2 (.8)
    m3 = retrieval_metrics(img, txt2, neg, label, neg_label, cid, ks=(1,))
    assert m3["1pos2neg_t2i/R@1"] == pytest.approx(2 / 3)


def test_duplicate_captions_are_all_correct():
    img = _unit([1, 0], [0.9, 0.1])
    txt = _unit([0, 1], [0, 1])  # the same caption twice; both far from the images: ties only among correct
    m = retrieval_metrics(img, txt, img.new_zeros(2, 0, 2), torch.tensor([0, 0]), torch.zeros(2, 0, dtype=torch.long),
                          torch.tensor([5, 5]), ks=(1,))
    assert m["i2t/R@1"] == 1.0 and m["t2i/R@1"] == 1.0
    assert not any(k.startswith("1pos") for k in m)  # no negatives, no 1+M protocol


def test_task_accumulates_over_batches_and_resets():
    task = RetrievalTask(ks=[1])
    img = _unit([1, 0], [0, 1], [1, 1], [1, -1])
    txt = img.clone()
    for s in (slice(0, 2), slice(2, 4)):
        n = s.stop - s.start
        task.update({"image_features": img[s], "text_features": txt[s]},
                    {"index": torch.arange(s.start, s.stop), "caption_id": torch.arange(s.start, s.stop),
                     "label": torch.zeros(n, dtype=torch.long)}, "test")
    assert task.compute("test")["i2t/R@1"] == 1.0
    task.reset("test")
    assert task.compute("test") == {}


def test_loss_by_hand():
    task = RetrievalTask()
    img = _unit([1, 0], [0, 1])
    txt = _unit([1, 0], [1, 1])
    out = {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(2.0)}
    batch = {"caption_id": torch.tensor([0, 1])}
    logits = 2.0 * img @ txt.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2)))
    assert task.loss(out, batch).item() == pytest.approx(want.item(), rel=1e-5)
    # hard negatives join the image-to-text softmax; weight w counts a negative w times
    neg = _unit([0, 1], [1, 0]).view(2, 1, 2)
    base = task.loss(dict(out, neg_text_features=neg), batch)
    heavier = task.loss(dict(out, neg_text_features=neg, neg_log_weight=torch.full((2, 1), math.log(3.0))), batch)
    dropped = task.loss(dict(out, neg_text_features=neg, neg_log_weight=torch.full((2, 1), float("-inf"))), batch)
    assert heavier > base > task.loss(out, batch)
    assert dropped.item() == pytest.approx(task.loss(out, batch).item(), rel=1e-5)
    row0 = torch.cat([logits[0], 2.0 * (img[0] @ neg[0, 0]).view(1)])
    want_i2t0 = -row0.log_softmax(0)[0]
    i2t = torch.stack([want_i2t0, -torch.cat([logits[1], 2.0 * (img[1] @ neg[1, 0]).view(1)]).log_softmax(0)[1]])
    want = 0.5 * (i2t.mean() + F.cross_entropy(logits.T, torch.arange(2)))
    assert base.item() == pytest.approx(want.item(), rel=1e-5)


def test_loss_soft_targets_for_duplicates():
    img = _unit([1, 0], [0, 1])
    txt = _unit([1, 1], [1, 1])  # the same caption for both images
    out = {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(10.0)}
    logits = 10.0 * img @ txt.T
    t2i = logits.T.log_softmax(1)
    i2t = logits.log_softmax(1)
    soft_want = 0.5 * (-(0.5 * i2t).sum(1).mean() - (0.5 * t2i).sum(1).mean())
    hard_want = 0.5 * (-i2t.diagonal().mean() - t2i.diagonal().mean())
    soft = RetrievalTask().loss(out, {"caption_id": torch.tensor([3, 3])})
    hard = RetrievalTask(soft_duplicates=False).loss(out, {"caption_id": torch.tensor([3, 3])})
    assert soft.item() == pytest.approx(soft_want.item(), rel=1e-5)
    assert hard.item() == pytest.approx(hard_want.item(), rel=1e-5)


def test_task_rejects_bad_config_and_outputs():
    with pytest.raises(ValueError, match="task.ks"):
        RetrievalTask(ks=[0, 5])
    with pytest.raises(KeyError, match="text_features"):
        RetrievalTask().loss({"image_features": torch.zeros(2, 2)}, {})


def _loop_recall(scores, correct, ks):
    """The per-query loop the vectorised metric replaced (rank of the best correct item, ties against)."""
    hits = {k: 0 for k in ks}
    for i in range(scores.shape[0]):
        best = max(float(scores[i, j]) for j in range(scores.shape[1]) if correct[i, j])
        rank = sum(1 for j in range(scores.shape[1]) if not correct[i, j] and float(scores[i, j]) >= best)
        for k in ks:
            hits[k] += rank < k
    return {k: hits[k] / scores.shape[0] for k in ks}


def _loop_cols(label, neg_label):
    """The old O(n*m) Python loop of the 1+M text-to-image gallery."""
    members = {int(c): torch.nonzero(label == c).flatten() for c in torch.unique(label)}
    n, m = neg_label.shape
    cols = torch.full((n, m), -1, dtype=torch.long)
    for i in range(n):
        for j in range(m):
            pool = members.get(int(neg_label[i, j]))
            if pool is not None and len(pool):
                cols[i, j] = pool[i % len(pool)]
    return cols


@pytest.mark.parametrize("block_mb", [1e-4, 0.01, 256.0])  # 1 query per chunk, a few, all at once
def test_chunked_recall_matches_full_matrix_and_loop(block_mb):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(90, 8, generator=g), dim=-1)
    txt[5] = txt[4]  # exact ties between captions
    img_key = torch.arange(37)
    txt_key = torch.randint(0, 37, (90,), generator=g)
    txt_key[:37] = torch.arange(37)  # every image has at least one caption
    ks = (1, 5, 10)
    full = recall_at_k(img @ txt.T, img_key[:, None] == txt_key[None, :], ks)
    chunked = recall_at_k_chunked(img, txt, img_key, txt_key, ks, max_block_mb=block_mb)
    assert chunked == pytest.approx(full)
    assert chunked == pytest.approx(_loop_recall(img @ txt.T, img_key[:, None] == txt_key[None, :], ks))
    t2i = recall_at_k_chunked(txt, img, txt_key, img_key, ks, max_block_mb=block_mb)
    assert t2i == pytest.approx(_loop_recall(txt @ img.T, txt_key[:, None] == img_key[None, :], ks))


def test_chunked_recall_rejects_queries_without_a_correct_item():
    x = torch.eye(3)
    with pytest.raises(ValueError, match="at least one correct"):
        recall_at_k_chunked(x, x, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), (1,))


def test_one_image_per_class_matches_the_old_loop():
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 6, (50,), generator=g)
    label[label == 3] = 2  # class 3 has no image
    neg_label = torch.randint(-1, 8, (50, 4), generator=g)  # -1, a class without images, classes 6, 7 unseen
    assert torch.equal(one_image_per_class(label, neg_label), _loop_cols(label, neg_label))
    unlabelled = torch.full((5,), -1)
    assert bool((one_image_per_class(unlabelled, torch.full((5, 2), -1)) == -1).all())
