"""CoOp against my transcription of the official PromptLearner / TextEncoder / CustomCLIP
(KaiyangZhou/CoOp trainers/coop.py:37-208; never imported, written from reading it) on a tiny
random CLIP; the inert-key checks; Dassl's constant warm-up schedule; drop_last."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from prompttune.methods.coop import CoOp, PromptLearner

CLASSES = ["striped_disc", "plain square", "dotted cross"]
LEFTOVER_PHRASE = "itap of a"  # 3 words, 4 tokens ("itap" is 2 BPE tokens) -> one leftover token


class _DM:
    def info(self):
        return {"classnames": CLASSES, "num_classes": len(CLASSES)}


def official_logits(bb, classnames, ctx, ctx_init, n_ctx, position, image_features):
    """Transcription of the official forward: prompt text = ctx_init phrase (or n_ctx "X"), class
    names '_' -> ' ', prefix = SOS embedding, suffix = embeddings after the first 1 + n_ctx tokens,
    context spliced in by position, text transformer, EOT pooling, projection, cosine x logit scale."""
    m = bb.model
    if ctx_init:
        ctx_init = ctx_init.replace("_", " ")
        n_ctx = len(ctx_init.split(" "))
        prefix_text = ctx_init
    else:
        prefix_text = " ".join(["X"] * n_ctx)
    names = [c.replace("_", " ") for c in classnames]
    name_lens = [len(bb._tokenizer.encode(c)) for c in names]
    tokenized = bb.tokenize([prefix_text + " " + c + "." for c in names])
    emb = m.token_embedding(tokenized)
    prefix, suffix = emb[:, :1], emb[:, 1 + n_ctx:]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(len(names), -1, -1)
    if position == "end":
        prompts = torch.cat([prefix, ctx, suffix], dim=1)
    else:
        rows = []
        for i in range(len(names)):
            cls_i, rest = suffix[i:i + 1, :name_lens[i]], suffix[i:i + 1, name_lens[i]:]
            if position == "middle":
                h = n_ctx // 2
                rows.append(torch.cat([prefix[i:i + 1], ctx[i:i + 1, :h], cls_i, ctx[i:i + 1, h:], rest], 1))
            else:
                rows.append(torch.cat([prefix[i:i + 1], cls_i, ctx[i:i + 1], rest], 1))
        prompts = torch.cat(rows, 0)
    x = prompts + m.positional_embedding  # open_clip's transformer is batch-first: no LND permute
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    text = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ m.text_projection
    img = image_features / image_features.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return m.logit_scale.exp() * img @ text.t()


def _compare(bb, coop_kwargs, official_ctx_init, n_ctx, position):
    torch.manual_seed(0)
    m = CoOp(**coop_kwargs)
    m.setup(bb, _DM())
    ctx_ref = m.prompt_learner.ctx.detach().clone().requires_grad_(True)
    feats = torch.randn(6, bb.embed_dim)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    ours = m(bb, {"features": feats})["logits"]
    ref = official_logits(bb, CLASSES, ctx_ref, official_ctx_init, n_ctx, position, feats)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    F.cross_entropy(ours, labels).backward()
    F.cross_entropy(ref, labels).backward()
    torch.testing.assert_close(m.prompt_learner.ctx.grad, ctx_ref.grad, rtol=1e-4, atol=1e-6)
    return m


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_random_context_matches_official(tiny_clip, position, csc):
    m = _compare(tiny_clip, dict(n_ctx=4, class_specific=csc, class_token_position=position), None, 4, position)
    assert m.prompt_learner.ctx.shape == ((3, 4, tiny_clip.text_width) if csc else (4, tiny_clip.text_width))


@pytest.mark.parametrize("position", ["end", "middle"])
def test_leftover_token_of_an_init_phrase_is_kept_as_official(tiny_clip, position):
    words = LEFTOVER_PHRASE.split(" ")
    n_tokens = int(tiny_clip.tokenize([LEFTOVER_PHRASE])[0].nonzero().numel()) - 2
    assert n_tokens == len(words) + 1  # the fixture phrase really has a leftover token
    m = _compare(tiny_clip, dict(n_ctx=len(words), ctx_init=LEFTOVER_PHRASE, class_token_position=position),
                 LEFTOVER_PHRASE, len(words), position)
    assert m.prompt_learner.ctx.shape == (len(words), tiny_clip.text_width)
    if position == "end":  # at init the learned prompt IS the hand-written one, leftover token included
        with torch.no_grad():
            got = m.text_features(tiny_clip)
            ref = tiny_clip.encode_text(tiny_clip.tokenize([f"{LEFTOVER_PHRASE} {c.replace('_', ' ')}." for c in CLASSES]))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_class_specific_with_an_init_phrase_keeps_one_shared_context(tiny_clip):
    m = _compare(tiny_clip, dict(n_ctx=4, ctx_init="a photo of a", class_specific=True), "a photo of a", 4, "end")
    assert m.prompt_learner.ctx.shape == (4, tiny_clip.text_width)  # [M, W], as the official init branch


def test_random_init_draws_like_the_official_normal_(tiny_clip):
    torch.manual_seed(7)
    pl = PromptLearner(tiny_clip, CLASSES, n_ctx=16)
    torch.manual_seed(7)
    ref = torch.nn.init.normal_(torch.empty(16, tiny_clip.text_width), std=0.02)
    torch.testing.assert_close(pl.ctx.detach(), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------- compose-time checks
def test_defaults_are_the_paper_main_setting():
    from prompttune.config import compose

    cfg = compose(None, ["method=coop"])
    m = cfg.method
    assert (m.n_ctx, m.ctx_init, m.init_std, m.class_specific, m.class_token_position) == (16, None, 0.02, False, "end")
    assert (m.optim.name, m.optim.lr, m.optim.warmup_type, m.optim.warmup_lr, m.optim.warmup_epochs) == \
        ("sgd", 0.002, "constant", 1e-5, 1)


def test_n_ctx_inert_with_an_init_phrase_is_a_config_error():
    from prompttune.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"method.n_ctx=16 is inert with method.ctx_init='a photo of a'.*n_ctx=4"):
        compose(None, ["method=coop", "method.ctx_init=a photo of a"])
    assert compose(None, ["method=coop", "method.ctx_init=a photo of a", "method.n_ctx=4"]).method.n_ctx == 4
    with pytest.raises(ConfigError, match="method.class_token_position='back'"):
        compose(None, ["method=coop", "method.class_token_position=back"])
    with pytest.raises(ConfigError, match="method.optim.warmup_type='cosine'"):
        compose(None, ["method=coop", "method.optim.warmup_type=cosine"])


def test_n_ctx_inert_is_rejected_by_the_cli_before_compute(cli, tmp_path):
    r = cli("fit", "experiments/smoke.yaml", "method=coop", "method.ctx_init=a photo of a",
            f"run_dir={tmp_path / 'run'}", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "method.n_ctx=16 is inert with method.ctx_init" in r.stderr
    assert not (tmp_path / "run" / "result.json").exists()


# ---------------------------------------------------------------------------- schedule and loader
def dassl_constant_warmup_lrs(base_lr, epochs, warmup_epochs, cons_lr):
    """Transcription of Dassl's build_lr_scheduler(cosine) + ConstantWarmupScheduler with
    WARMUP_RECOUNT=True, stepped once per epoch (CoOp forward_backward -> update_lr at the last batch)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs))
    for g in opt.param_groups:  # the wrapper's construction step: last_epoch 0 < warmup -> cons_lr
        g["lr"] = cons_lr
    last_epoch, lrs = 0, []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if last_epoch >= warmup_epochs:
            successor.step()
        else:
            last_epoch += 1
            lr = successor.get_last_lr()[0] if last_epoch >= warmup_epochs else cons_lr
            for g in opt.param_groups:
                g["lr"] = lr
    return lrs


def test_constant_warmup_schedule_matches_dassl():
    from prompttune.module import constant_warmup_lambda

    epochs, base = 200, 0.002
    want = dassl_constant_warmup_lrs(base, epochs, 1, 1e-5)
    fn = constant_warmup_lambda("cosine", epochs, 1, 1e-5 / base)
    got = [base * fn(e) for e in range(epochs)]
    assert got[0] == pytest.approx(1e-5) and got[1] == pytest.approx(base)  # epoch 0 constant, epoch 1 full lr
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert got[-1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 198 / 200)))


def test_coop_fit_steps_the_lr_per_epoch_with_constant_warmup(tmp_path):
    """Through Lightning: epoch 0 trains at warmup_lr, epoch 1 at the full lr (interval 'epoch')."""
    import lightning as L

    from prompttune.config import compose
    from prompttune.runs import build, make_module

    cfg = compose("experiments/smoke.yaml", ["method=coop", "data.shots=2", "method.optim.epochs=2",
                                             "trainer.limit_train_batches=2"])
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))

    bb, dm, method, task = build(cfg)
    module = make_module(cfg, bb, method, task)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()],
                        default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert [lr for e, lr in seen if e == 0] == pytest.approx([1e-5, 1e-5])
    assert [lr for e, lr in seen if e == 1] == pytest.approx([0.002, 0.002])


def test_drop_last_drops_the_partial_training_batch(tmp_path):
    from prompttune.data.image_folder import ImageFolderDataModule, ensure_synthetic

    root = tmp_path / "w"
    ensure_synthetic({"kind": "classification", "n_train": 3, "n_val": 1, "n_test": 1, "side": 8, "seed": 0}, root)
    kw = dict(root=str(root), split_file="split_prompttune_world.json", batch_size=10)
    n = 16 * 3  # 48 training images
    assert len(ImageFolderDataModule(**kw).train_dataloader()) == math.ceil(n / 10) == 5
    assert len(ImageFolderDataModule(**kw, drop_last=True).train_dataloader()) == n // 10 == 4
    assert len(ImageFolderDataModule(**kw, drop_last=True).test_dataloader()) == 1  # never on eval splits
