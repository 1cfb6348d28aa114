"""MaPLe against our transcription of the official code (muzairkhattak/multimodal-prompt-learning,
trainers/maple.py + clip/model.py) on tiny random open_clip weights: same logits, same gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from prompttune.config import ConfigError
from prompttune.methods import _clip_deep_prompts as deep
from prompttune.methods.maple import MaPLe, MaPLeRetrieval
from prompttune.module import PromptTuningModule
from prompttune.tasks.classification import ClassificationTask


# ---------------------------------------------------------------- transcription of the official forward
def _official_block(blk, x, attn_mask=None):
    """ResidualAttentionBlock_MaPLe's computation after its prompt replacement, sequence-first (LND)."""
    a = blk.attn
    h = blk.ln_1(x)
    out = F.multi_head_attention_forward(h, h, h, a.embed_dim, a.num_heads, a.in_proj_weight, a.in_proj_bias,
                                         None, None, False, 0.0, a.out_proj.weight, a.out_proj.bias,
                                         training=False, need_weights=False, attn_mask=attn_mask)[0]
    x = x + out
    return x + blk.mlp(blk.ln_2(x))


def official_logits(model, tokenize, classnames, image, ctx, proj, compound_text, compound_proj, n_ctx, ctx_init):
    """MultiModalPromptLearner.forward + CustomCLIP.forward (maple.py:138-204), TextEncoder (43-66),
    VisionTransformer_MaPLe.forward (model.py:445-477), ResidualAttentionBlock_MaPLe.forward (287-331)."""
    prompts_txt = [ctx_init + " " + name.replace("_", " ") + "." for name in classnames]
    tokenized = tokenize(prompts_txt)
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    token_prefix, token_suffix = embedding[:, :1, :], embedding[:, 1 + n_ctx:, :]
    n_cls = len(classnames)
    prompts = torch.cat([token_prefix, ctx.unsqueeze(0).expand(n_cls, -1, -1), token_suffix], dim=1)
    visual_deep = [layer(compound_text[i]) for i, layer in enumerate(compound_proj)]
    shared_ctx = proj(ctx)

    # text encoder
    x = prompts + model.positional_embedding
    x = x.permute(1, 0, 2)
    counter = 0
    for i, blk in enumerate(model.transformer.resblocks):
        if i != 0 and len(compound_text) > 0 and not counter > len(compound_text) - 1:
            prefix, suffix = x[:1, :, :], x[1 + n_ctx:, :, :]
            textual_context = compound_text[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([prefix, textual_context, suffix], dim=0)
            counter += 1
        x = _official_block(blk, x, model.attn_mask)
    x = model.ln_final(x.permute(1, 0, 2))
    x = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)]
    tp = model.text_projection
    text_features = tp(x) if isinstance(tp, torch.nn.Linear) else x @ tp

    # image encoder
    v = model.visual
    y = v.conv1(image)
    y = y.reshape(y.shape[0], y.shape[1], -1).permute(0, 2, 1)
    y = torch.cat([v.class_embedding + torch.zeros(y.shape[0], 1, y.shape[-1]), y], dim=1)
    y = y + v.positional_embedding
    y = torch.cat([y, shared_ctx.expand(y.shape[0], -1, -1)], dim=1)
    y = v.ln_pre(y).permute(1, 0, 2)
    counter = 0
    for i, blk in enumerate(v.transformer.resblocks):
        if i != 0 and len(visual_deep) > 0 and not counter > len(visual_deep) - 1:
            prefix = y[0:y.shape[0] - n_ctx, :, :]
            visual_context = visual_deep[counter].expand(y.shape[1], -1, -1).permute(1, 0, 2)
            y = torch.cat([prefix, visual_context], dim=0)
            counter += 1
        y = _official_block(blk, y)
    y = v.ln_post(y.permute(1, 0, 2)[:, 0, :]) @ v.proj

    image_features = y / y.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text_features.t()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def batch(fine_dm):
    fine_dm.setup("fit")
    ds = fine_dm.datasets["train"]
    return default_collate([ds[i] for i in range(6)])


@pytest.fixture(scope="module")
def fdrd_dm_small(make_fdrd_dm):
    return make_fdrd_dm(1)


def _maple(tiny_clip, fine_dm, **kw):
    torch.manual_seed(0)
    kw.setdefault("prompt_depth", 3)
    m = MaPLe(**kw)
    m.setup(tiny_clip, fine_dm)
    return m


def _grads(params):
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("n_ctx,ctx_init,depth", [(2, "a photo of a", 3), (3, None, 2), (2, "a photo of a", 1)])
def test_logits_and_gradients_match_official_transcription(tiny_clip, fine_dm, batch, n_ctx, ctx_init, depth):
    m = _maple(tiny_clip, fine_dm, n_ctx=n_ctx, ctx_init=ctx_init, prompt_depth=depth)
    # perturb the deep projections so that they differ (they start as copies of one layer, as official)
    with torch.no_grad():
        for lin in m.prompts.deep_proj:
            lin.weight.add_(0.01 * torch.randn_like(lin.weight))
    params = [p for p in m.parameters() if p.requires_grad]
    labels = batch["label"]
    ours = m(tiny_clip, batch)["logits"]
    F.cross_entropy(ours, labels).backward()
    g_ours = _grads(params)
    m.zero_grad()
    pl = m.prompts
    ref = official_logits(tiny_clip.model, tiny_clip.tokenize, fine_dm.info()["classnames"], batch["image"],
                          pl.ctx, pl.proj, list(pl.deep_text), list(pl.deep_proj), n_ctx, m.prefix_text)
    F.cross_entropy(ref, labels).backward()
    g_ref = _grads(params)
    assert ours.shape == (6, len(fine_dm.info()["classnames"]))
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_ours, g_ref):
        assert b.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_parameters_init_and_shapes(tiny_clip, fine_dm):
    m = _maple(tiny_clip, fine_dm, n_ctx=2, ctx_init="a photo of a", prompt_depth=3)
    wt, wv = deep.tower_widths(tiny_clip.model)
    names = {n: p.shape for n, p in m.named_parameters()}
    assert names == {"prompts.ctx": (2, wt), "prompts.deep_text.0": (2, wt), "prompts.deep_text.1": (2, wt),
                     "prompts.proj.weight": (wv, wt), "prompts.proj.bias": (wv,),
                     "prompts.deep_proj.0.weight": (wv, wt), "prompts.deep_proj.0.bias": (wv,),
                     "prompts.deep_proj.1.weight": (wv, wt), "prompts.deep_proj.1.bias": (wv,)}
    # ctx from "a photo" (n_ctx = 2), the prompt still reads "a photo of a <class>." (official maple.py:84-92,121)
    with torch.no_grad():
        want = tiny_clip.token_embedding(tiny_clip.tokenize(["a photo"]))[0, 1:3]
    assert torch.equal(m.prompts.ctx.data, want) and m.prefix_text == "a photo of a"
    # the deep projections are clones of one layer (official _get_clones)
    assert torch.equal(m.prompts.deep_proj[0].weight, m.prompts.deep_proj[1].weight)
    assert not torch.equal(m.prompts.proj.weight, m.prompts.deep_proj[0].weight)
    # random init beyond 4 tokens, as official
    r = _maple(tiny_clip, fine_dm, n_ctx=5, ctx_init="a photo of a", prompt_depth=1)
    assert r.prefix_text == "X X X X X" and r.prompts.ctx.std() < 0.05


def test_no_prompts_reduces_to_clip(tiny_clip, batch):
    """The deep-prompt encoders without prompts are open_clip's own encoders."""
    with torch.no_grad():
        img = deep.encode_image(tiny_clip.model, batch["image"], None)
        assert torch.allclose(img, tiny_clip.encode_image(batch["image"]), atol=1e-5)
        tok = tiny_clip.tokenize(["a red striped disc", "a small dotted cross"])
        txt = deep.encode_text(tiny_clip.model, tiny_clip.token_embedding(tok), tok)
        assert torch.allclose(txt, tiny_clip.encode_text(tok), atol=1e-5)


def test_gradients_reach_exactly_the_prompts_and_loss_falls(tiny_clip, fine_dm, batch):
    m = _maple(tiny_clip, fine_dm)
    task = ClassificationTask(info=fine_dm.info())
    PromptTuningModule(tiny_clip, m, task)  # asserts that nothing else requires grad
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(m(tiny_clip, batch)["logits"], batch["label"])
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is None for p in tiny_clip.parameters())
    assert losses[-1] < losses[0] - 0.05


def test_retrieval_variant(tiny_clip, fdrd_dm_small):
    dm = fdrd_dm_small
    torch.manual_seed(0)
    m = MaPLeRetrieval(prompt_depth=2)
    m.setup(tiny_clip, dm)
    ds = dm.datasets["test"]
    b = ds.collate([ds[i] for i in range(4)])
    m.eval()
    out = m(tiny_clip, b)
    d = tiny_clip.embed_dim
    assert out["image_features"].shape == (4, d) and out["text_features"].shape == (4, d)
    assert out["neg_text_features"].shape == (4, 4, d)
    # the caption follows "a photo of a", whose first two tokens are learned
    tok = tiny_clip.tokenize([f"a photo of a {b['caption'][0]}"])
    with torch.no_grad():
        emb = tiny_clip.token_embedding(tok)
        emb[:, 1:3] = m.prompts.ctx
        want = deep.encode_text(tiny_clip.model, emb, tok, list(m.prompts.deep_text))
    assert torch.allclose(out["text_features"][0], F.normalize(want, dim=-1)[0], atol=1e-5)


def test_bad_depth_and_config_rejected(tiny_clip, fine_dm):
    with pytest.raises(ConfigError, match=r"method.prompt_depth=9.*\[1, 3\]"):
        _maple(tiny_clip, fine_dm, prompt_depth=9)
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="method.n_ctx=0"):
        MaPLe.check_config(OmegaConf.create({"method": {"n_ctx": 0, "prompt_depth": 3}}))
    with pytest.raises(TypeError, match="CLIP backbone"):
        MaPLe().setup(torch.nn.Linear(2, 2), fine_dm)
