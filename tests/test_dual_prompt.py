"""DCAR as its Fig. 2 describes it (dual_prompt), on the untrained tiny CLIP and tiny FDRD data."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from prompttune.config import ConfigError
from prompttune.methods.dual_prompt import DualPrompt
from prompttune.module import PromptTuningModule
from prompttune.tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def fdrd_dm(make_fdrd_dm):
    return make_fdrd_dm(1)




def _method(tiny_clip, dm, **kw):
    torch.manual_seed(0)
    kw.setdefault("prompt_depth", 2)
    m = DualPrompt(**kw)
    m.setup(tiny_clip, dm)
    return m


def test_prompt_layout_and_trainable_parameters(tiny_clip, fdrd_dm):
    m = _method(tiny_clip, fdrd_dm)
    tokens, words = m._tokens(tiny_clip, ["a large red striped disc"])
    # [SOT] "a photo" (learned, n_ctx=2) "of a" (kept) caption [EOT]: the caption words are the weighted ones
    ref = tiny_clip.tokenize(["a photo of a a large red striped disc"])
    assert torch.equal(tokens, ref) and m.n_prefix == 4
    eot = int(tokens[0].argmax())
    assert words[0].nonzero().flatten().tolist() == list(range(5, eot))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"prompts.ctx", "prompts.proj.weight", "prompts.deep_text.0", "prompts.deep_proj.0.weight",
            "caa.down.weight", "caa.up.weight"} <= names
    # CAA is the identity at initialisation
    x = torch.randn(3, tiny_clip.embed_dim)
    assert torch.equal(m.caa(x), x)
    # no visual prompts: the image side is the frozen, cacheable one and has no parameters
    t = _method(tiny_clip, fdrd_dm, visual_prompt="none")
    assert t.consumes == "image_features" and not any("proj" in n for n, _ in t.named_parameters())


def test_token_weights_follow_fig2_by_hand(tiny_clip, fdrd_dm):
    m = _method(tiny_clip, fdrd_dm, reweight_strength=1.0, reweight_momentum=0.5)
    tokens, words = m._tokens(tiny_clip, ["a large red disc", "a small disc"])
    img = F.normalize(torch.randn(2, tiny_clip.embed_dim), dim=-1)
    blank = F.normalize(torch.randn(tiny_clip.embed_dim), dim=-1)
    w = m.dynamic_weights(tiny_clip, tokens, words, img, blank)
    for r in range(2):
        pos = words[r].nonzero().flatten().tolist()
        raw = []
        for p in pos:
            with torch.no_grad():
                t = F.normalize(tiny_clip.encode_text(torch.tensor([[tokens[r, 0], tokens[r, p], int(tokens[r].max())]
                                                                    + [0] * (tokens.shape[1] - 3)])).float(), dim=-1)[0]
            raw.append(abs(float(t @ blank) - float(t @ img[r])))  # |S(token, blank) - S(token, I')|
        want = torch.tensor(raw) / (sum(raw) / len(raw))
        assert torch.allclose(w[r, pos], want, atol=1e-4)
        assert bool((w[r][~words[r]] == 1).all())  # prompts, [SOT], [EOT], padding: unweighted
    # strength 0 turns the weights off; the running table holds the mean weight of each token id
    assert torch.equal(m._blend(w, words), w)
    m.reweight_strength = 0.0
    assert bool((m._blend(w, words) == 1).all())
    disc = int(tokens[0, words[0].nonzero().flatten()[-1]])
    assert bool(m.token_weight_seen[disc]) and float(m.token_weight_table[disc]) == pytest.approx(
        float((w[0][tokens[0] == disc].mean() + w[1][tokens[1] == disc].mean()) / 2), abs=1e-5)


def test_negatives_swap_every_occurrence_and_alter_attributes(tiny_clip, fdrd_dm):
    m = _method(tiny_clip, fdrd_dm, swap_negatives=2, attr_negatives=2, alpha=0.5)
    lab = m.classnames.index("striped disc")
    cap = "a large red striped disc; the Striped Disc is large."  # names its class twice
    negs, logw = m.make_negatives([cap], [lab])
    assert len(negs) == 4 and logw.shape == (1, 4)
    for neg in negs[:2]:  # category-swapped: no occurrence of the true class left, weight 1
        assert "striped disc" not in neg.lower()
        assert any(neg.count(m.classnames[c]) == 2 for c in m.neg_pool_idx[lab].tolist())
    assert logw[0, :2].tolist() == [0.0, 0.0]
    for neg in negs[2:]:  # attribute-altered, same category: weight 1 + alpha
        assert neg != cap and neg.lower().count("striped disc") == 2
        changed = [(a, b) for a, b in zip(cap.split(" "), neg.split(" ")) if a != b]
        assert len(changed) == 1
    assert logw[0, 2:].tolist() == pytest.approx([math.log(1.5)] * 2)
    # a caption without attribute words or its class name: those slots are dropped
    negs, logw = m.make_negatives(["something else"], [lab])
    assert bool(torch.isinf(logw).all())
    flat = _method(tiny_clip, fdrd_dm, category_weighting=False)
    assert bool((flat.make_negatives([cap], [lab])[1] == 0).all())


def test_l_cate_by_hand_and_outputs(tiny_clip, fdrd_dm, retrieval_batch):
    m = _method(tiny_clip, fdrd_dm, token_reweight=False, caa=False, alpha=1.0)
    b = retrieval_batch(fdrd_dm, tiny_clip, n=6)
    m.train()
    m._gen.manual_seed(3)
    out = m(tiny_clip, b)
    d = tiny_clip.embed_dim
    assert out["image_features"].shape == (6, d) and out["text_features"].shape == (6, d)
    m._gen.manual_seed(3)
    negs, logw = m.make_negatives(list(b["caption"]), b["label"].tolist())
    with torch.no_grad():
        nt, _ = m._tokens(tiny_clip, negs)
        neg = m.encode_text(tiny_clip, nt).view(6, 4, d)
        img, txt, s = out["image_features"], out["text_features"], float(tiny_clip.logit_scale)
        loss = 0.0
        for i in range(6):
            terms = [math.exp(s * float(img[i] @ txt[i]))]
            terms += [math.exp(s * float(img[i] @ neg[i, j]) + float(logw[i, j])) for j in range(4)]
            loss += -math.log(terms[0] / sum(terms))
    assert float(out["l_cate"]) == pytest.approx(loss / 6, rel=1e-4)
    m.eval()
    tb = retrieval_batch(fdrd_dm, tiny_clip, "test", n=6)
    out = m(tiny_clip, tb)
    assert out["neg_text_features"].shape == (6, 4, d) and "aux_loss" not in out


def test_gradients_reach_exactly_the_trainable_parts_and_loss_falls(tiny_clip, fdrd_dm, retrieval_batch):
    m = _method(tiny_clip, fdrd_dm)
    task = RetrievalTask()
    PromptTuningModule(tiny_clip, m, task)  # asserts nothing else requires grad
    m.train()
    b = retrieval_batch(fdrd_dm, tiny_clip, n=8)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    losses = []
    for step in range(6):
        m._gen.manual_seed(0)  # the same negatives each step: a fixed objective
        loss = task.loss(m(tiny_clip, b), b)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # CAA's up-projection starts at zero (identity), so its down-projection waits a step
            for n, p in m.named_parameters():
                assert p.grad is not None and (p.grad.abs().sum() > 0) == (not n.startswith("caa.down")), n
            assert all(p.grad is None for p in tiny_clip.parameters())
        if step == 1:
            assert m.caa.down.weight.grad.abs().sum() > 0
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0] - 0.05


def test_switches_turn_components_off(tiny_clip, fdrd_dm, retrieval_batch):
    b = retrieval_batch(fdrd_dm, tiny_clip, n=6)
    m = _method(tiny_clip, fdrd_dm, token_reweight=False, cate_loss=False, caa=False, category_weighting=False)
    m.train()
    out = m(tiny_clip, b)
    assert "aux_loss" not in out and m.caa is None and not bool(m.token_weight_seen.any())
    tokens, words = m._tokens(tiny_clip, ["a red disc"])
    assert m.eval_weights(tokens, words) is None
    t = _method(tiny_clip, fdrd_dm, visual_prompt="none")
    t.train()
    out = t(tiny_clip, b)  # reads the cached frozen features
    assert torch.allclose(out["image_features"], F.normalize(b["features"], dim=-1))


@pytest.mark.parametrize("key,value,match", [
    ("visual_prompt", "both", "method.visual_prompt='both'.*coupled, independent, none"),
    ("blank", "grey", "method.blank='grey'"),
    ("reweight_strength", 1.5, r"method.reweight_strength=1.5.*\[0, 1\]"),
    ("alpha", -1, "method.alpha=-1"),
    ("eval_reweight", "batch", "method.eval_reweight='batch'"),
])
def test_bad_config_rejected(key, value, match):
    with pytest.raises(ConfigError, match=match):
        DualPrompt.check_config(OmegaConf.create({"method": {key: value}}))


def test_inert_combinations_rejected():
    with pytest.raises(ConfigError, match="method.caa=True: has no effect without L_cate"):
        DualPrompt.check_config(OmegaConf.create({"method": {"cate_loss": False, "caa": True}}))
    with pytest.raises(ConfigError, match="L_cate needs negatives"):
        DualPrompt.check_config(OmegaConf.create({"method": {"swap_negatives": 0, "attr_negatives": 0}}))


def test_depth_beyond_the_backbone_rejected(tiny_clip, fdrd_dm):
    with pytest.raises(ConfigError, match="method.prompt_depth=9"):
        _method(tiny_clip, fdrd_dm, prompt_depth=9)
