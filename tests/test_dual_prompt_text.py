"""DCAR text-only variant (dual_prompt_text) and the retrieval baselines, on the untrained tiny CLIP and FDRD data."""

import math

import pytest
import torch

from prompttune.data.fdrd import swap_class
from prompttune.methods.dual_prompt_text import DualPromptText as DualPrompt, split_on_class
from prompttune.methods.retrieval_baselines import CoOpRetrieval, ZeroShotRetrieval
from prompttune.module import PromptTuningModule
from prompttune.tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def fdrd_dm(make_fdrd_dm):
    return make_fdrd_dm(2)




def _method(tiny_clip, dm, **kw):
    kw.setdefault("mi_init_max_pairs", 8)  # keep setup's occlusion pass small
    m = DualPrompt(**kw)
    m.setup(tiny_clip, dm)
    return m


def test_caption_helpers():
    assert split_on_class("a large red Striped Disc", "striped disc") == ("a large red ", "Striped Disc", "")
    assert swap_class("a striped disc", "striped disc", "dotted cross") == "a dotted cross"
    assert split_on_class("a cat", "dog") is None


def test_setup_shapes_and_prompt_layout(tiny_clip, fdrd_dm):
    m = _method(tiny_clip, fdrd_dm, n_attr_ctx=3, attr_init=None, n_cat_ctx=2)
    w = tiny_clip.text_width
    assert m.attr_ctx.shape == (3, w) and m.cat_ctx.shape == (2, w)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 5 * w
    cap = "a large red striped disc"
    lab = m.classnames.index("striped disc")
    tokens, slots, words = m._assemble(tiny_clip, [cap], [lab])
    ids = m._word_ids(tiny_clip, ["a large red", "striped disc"])
    row, slot = tokens[0].tolist(), slots[0].tolist()
    n_pre, n_cls = len(ids[0]), len(ids[1])
    # [SOT] prefix class P_c(2) P_a(3) [EOT]: the sub-category prompt right after the class name,
    # the attribute prompt after the caption (attr_position=end)
    assert row[0] == m._sot and row[1:1 + n_pre] == ids[0] and row[1 + n_pre:1 + n_pre + n_cls] == ids[1]
    assert slot[1 + n_pre + n_cls:1 + n_pre + n_cls + 5] == [3, 4, 0, 1, 2]
    eot = 1 + n_pre + n_cls + 5
    assert row[eot] == m._eot and int(tokens[0].argmax()) == eot
    assert words[0].sum() == n_pre + n_cls
    front = _method(tiny_clip, fdrd_dm, n_attr_ctx=2, attr_init=None, n_cat_ctx=1, attr_position="front",
                    cat_position="before")
    _, s2, _ = front._assemble(tiny_clip, [cap], [lab])
    assert s2[0, 1:3].tolist() == [0, 1] and s2[0, 3 + n_pre] == 2
    # a caption without its class name gets the sub-category prompt at its start
    _, s3, _ = front._assemble(tiny_clip, ["something else"], [lab])
    assert s3[0, 3] == 2


def test_forward_train_and_eval_outputs(tiny_clip, fdrd_dm, retrieval_batch):
    m = _method(tiny_clip, fdrd_dm, n_negatives=3)
    b = retrieval_batch(fdrd_dm, tiny_clip)
    m.train()
    out = m(tiny_clip, b)
    d = tiny_clip.embed_dim
    assert out["image_features"].shape == (8, d) and out["text_features"].shape == (8, d)
    assert out["neg_text_features"].shape == (8, 3, d) and out["neg_log_weight"].shape == (8, 3)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(8), atol=1e-5)
    # category-match weights: log(1 + lambda * mu) with mu in [0, 1]
    lw = out["neg_log_weight"]
    assert bool(((lw >= 0) & (lw <= math.log(2.0) + 1e-6)).all())
    m.eval()
    tb = retrieval_batch(fdrd_dm, tiny_clip, "test")
    out = m(tiny_clip, tb)
    assert out["neg_text_features"].shape == (8, 4, d) and "neg_log_weight" not in out


def test_negatives_swap_the_sub_category(tiny_clip, fdrd_dm, retrieval_batch):
    m = _method(tiny_clip, fdrd_dm, n_negatives=4, neg_perspectives=["text", "visual"], neg_pool=2)
    b = retrieval_batch(fdrd_dm, tiny_clip)
    caps, labels = list(b["caption"]), b["label"].tolist()
    negs, neg_labels, logw = m.sample_negatives(caps, labels)
    for i, (cap, lab) in enumerate(zip(caps, labels)):
        for j in range(4):
            neg, nl = negs[4 * i + j], neg_labels[4 * i + j]
            if torch.isinf(logw[i, j]):
                continue
            assert nl != lab and bool(m.neg_pool_mask[lab, nl])
            assert neg == swap_class(cap, m.classnames[lab], m.classnames[nl])
    # a pool of at most 2 per perspective x 2 perspectives
    assert int(m.neg_pool_mask.sum(1).max()) <= 4 and not bool(m.neg_pool_mask.diagonal().any())
    unweighted = _method(tiny_clip, fdrd_dm, category_weighting=False)
    assert bool((unweighted.sample_negatives(caps, labels)[2] == 0).all())


def test_gradients_reach_exactly_the_prompts(tiny_clip, fdrd_dm, retrieval_batch):
    m = _method(tiny_clip, fdrd_dm)
    task = RetrievalTask()
    module = PromptTuningModule(tiny_clip, m, task)  # asserts nothing else requires grad
    module.train()
    b = retrieval_batch(fdrd_dm, tiny_clip)
    loss = task.loss(m(tiny_clip, b), b)
    loss.backward()
    assert m.attr_ctx.grad is not None and m.attr_ctx.grad.abs().sum() > 0
    assert m.cat_ctx.grad is not None and m.cat_ctx.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_clip.parameters())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"attr_ctx", "cat_ctx"}


def test_loss_falls(tiny_clip, fdrd_dm, retrieval_batch):
    torch.manual_seed(0)
    m = _method(tiny_clip, fdrd_dm, token_reweight=False, n_negatives=2)
    task = RetrievalTask()
    m.train()
    b = retrieval_batch(fdrd_dm, tiny_clip, n=8)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    first = None
    for _ in range(6):
        m._gen.manual_seed(0)  # the same negatives each step: a fixed objective
        loss = task.loss(m(tiny_clip, b), b)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.05


def test_mi_scores_and_weights(tiny_clip, fdrd_dm, retrieval_batch):
    m = _method(tiny_clip, fdrd_dm, reweight_strength=0.4, mi_momentum=0.5)
    assert m.mi_ids.numel() > 0 and bool((m.mi_ids[1:] > m.mi_ids[:-1]).all())  # sorted, unique
    # the running mean by hand
    m.mi_ids, m.mi_val = torch.tensor([5, 9]), torch.tensor([1.0, 2.0])
    m._update_mi(torch.tensor([9, 9, 11]), torch.tensor([4.0, 6.0, 3.0]), momentum=0.5)
    assert m.mi_ids.tolist() == [5, 9, 11]
    assert m.mi_val.tolist() == pytest.approx([1.0, 0.5 * 2.0 + 0.5 * 5.0, 3.0])
    tokens = torch.tensor([[1, 5, 9, 11, 7, 0]])
    words = torch.tensor([[False, True, True, True, True, False]])
    w = m.token_weights(tokens, words)
    assert w[0, 0] == 1 and w[0, 5] == 1 and w[0, 4] == 1  # not a word, or unseen (7)
    assert bool(((w >= 0.6) & (w <= 1.4)).all())
    assert w[0, 2] > w[0, 3] > w[0, 1]  # higher MI score, higher weight
    # the scores move with training (the dynamic part) and are saved with the trainable state
    m.mi_ids, m.mi_val = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    m.train()
    m(tiny_clip, retrieval_batch(fdrd_dm, tiny_clip))
    assert m.mi_ids.numel() > 0
    state = m.state_dict()
    fresh = _method(tiny_clip, fdrd_dm, mi_init_max_pairs=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mi_ids, m.mi_ids) and torch.equal(fresh.attr_ctx, m.attr_ctx)


def test_switches_turn_components_off(tiny_clip, fdrd_dm, retrieval_batch):
    b = retrieval_batch(fdrd_dm, tiny_clip)
    m = _method(tiny_clip, fdrd_dm, token_reweight=False, hard_negatives=False, n_cat_ctx=0)
    m.train()
    out = m(tiny_clip, b)
    assert "neg_text_features" not in out and m.cat_ctx is None and m.mi_ids.numel() == 0
    tokens, _, words = m._assemble(tiny_clip, ["a red disc"], [0])
    assert m.token_weights(tokens, words) is None


def test_baselines(tiny_clip, fdrd_dm, retrieval_batch):
    coop = CoOpRetrieval(n_ctx=3)
    coop.setup(tiny_clip, fdrd_dm)
    assert [n for n, p in coop.named_parameters() if p.requires_grad] == ["attr_ctx"]
    assert coop.attr_ctx.shape == (3, tiny_clip.text_width) and not coop.hard_negatives and not coop.token_reweight
    # CoOp's layout: [SOT] [V]_1..[V]_M caption [EOT] (context before the caption)
    tokens, slots, _ = coop._assemble(tiny_clip, ["a large red striped disc"], [0])
    assert slots[0, 1:4].tolist() == [0, 1, 2] and bool((slots[0, 4:] == -1).all())
    assert int(tokens[0, 4]) == coop._word_ids(tiny_clip, ["a"])[0][0]
    zs = ZeroShotRetrieval()
    zs.setup(tiny_clip, fdrd_dm)
    assert sum(p.numel() for p in zs.parameters()) == 0
    b = retrieval_batch(fdrd_dm, tiny_clip, "test")
    out = zs(tiny_clip, b)
    with torch.no_grad():
        want = torch.nn.functional.normalize(tiny_clip.encode_text(tiny_clip.tokenize(list(b["caption"]))), dim=-1)
    assert torch.allclose(out["text_features"], want, atol=1e-5)
    assert out["neg_text_features"].shape[:2] == (8, 4)


def test_bad_config_rejected(tiny_clip, fdrd_dm):
    with pytest.raises(ValueError, match="neg_perspectives.*valid: text, visual, random"):
        DualPrompt(neg_perspectives=["txt"])
    with pytest.raises(ValueError, match="reweight_strength"):
        DualPrompt(reweight_strength=1.5)
    with pytest.raises(ValueError, match="attr_position"):
        DualPrompt(attr_position="middle")
    with pytest.raises(TypeError, match="CLIP backbone"):
        DualPrompt().setup(torch.nn.Linear(2, 2), fdrd_dm)


@pytest.mark.slow
def test_smoke_fit(tmp_path):
    """The smoke experiment through the real run path, in-process."""
    from prompttune.config import compose
    from prompttune.runs import fit

    cfg = compose("experiments/smoke.yaml", ["method=dual_prompt_text", f"run_dir={tmp_path / 'run'}",
                                             "data.synthetic.n_train=2", "data.synthetic.n_val=1",
                                             "data.synthetic.n_test=2", f"data.root={tmp_path / 'data'}"])
    res = fit(cfg)
    assert res["status"] == "completed" and res["trainable_params"] > 0
    assert {"test/i2t/R@1", "test/t2i/R@10", "test/1pos4neg_i2t/R@1", "test/1pos4neg_t2i/R@1"} <= set(res["metrics"])
