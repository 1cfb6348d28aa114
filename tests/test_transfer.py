"""Zero-shot scorers (CLIP, BLIP-2 through transformers' Blip2ForConditionalGeneration) and the
source x target transfer matrix. Tiny random-weight models only; nothing is downloaded."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from prompttune.backbones.clip import CLIPBackbone
from prompttune.backbones.scorers import BLIP2Scorer, CLIPScorer, ScorerError, make_scorer
from prompttune.config import ConfigError


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPBackbone(zoo_entry="clip-tiny", weights="random")


# ---------------------------------------------------------------------------- CLIP scorer
def test_clip_scorer_against_hand_computation(clip):
    s = make_scorer(clip)
    assert isinstance(s, CLIPScorer)
    x = torch.rand(6, 3, 48, 48)  # another size: the scorer resizes to the model's 32 px
    names = ["disc", "square", "cross"]
    scores = s.class_scores(x, names)
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    xr = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    img = F.normalize(clip.encode_image((xr - mean) / std), dim=-1)
    txt = F.normalize(clip.encode_text(clip.tokenize([f"a photo of a {n}." for n in names])), dim=-1)
    want = clip.logit_scale * img @ txt.T
    assert torch.allclose(scores, want, atol=1e-4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert s.task_loss(x, labels, names).item() == pytest.approx(F.cross_entropy(want, labels).item(), rel=1e-5)
    hand = (want.argmax(-1) == labels).float().mean().item()
    assert s.accuracy(x, labels, names, batch_size=4) == pytest.approx(hand)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        s.task_loss(x, torch.tensor([0, 1, 2, 3, 0, 1]), names)


# ---------------------------------------------------------------------------- BLIP-2 scorer
class CharTokenizer:
    """HF-style call signature over a toy vocabulary: one id per character."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[4 + (ord(c) % (self.vocab - 4)) for c in t] for t in texts]}


def tiny_blip2(lm: str):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

    torch.manual_seed(0)
    w, v = 32, 64
    vision = dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    qformer = dict(vocab_size=v, hidden_size=w, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * w,
                   encoder_hidden_size=w, cross_attention_frequency=1)
    if lm == "opt":
        text = OPTConfig(vocab_size=v, hidden_size=w, num_hidden_layers=1, num_attention_heads=2, ffn_dim=2 * w,
                         max_position_embeddings=128, word_embed_proj_dim=w, pad_token_id=1, bos_token_id=2,
                         eos_token_id=3).to_dict()
    else:
        text = T5Config(vocab_size=v, d_model=w, d_kv=16, d_ff=2 * w, num_layers=1, num_decoder_layers=1, num_heads=2,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0).to_dict()
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4)
    model = Blip2ForConditionalGeneration(cfg).eval().requires_grad_(False)
    return model, CharTokenizer(v)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_scorer_loglikelihood_matches_the_lm_loss(lm):
    model, tok = tiny_blip2(lm)
    s = BLIP2Scorer(model, tok)
    assert s.decoder_only == (lm == "opt") and s.image_size == 16
    x = torch.rand(3, 3, 16, 16)
    names = ["cat", "ship", "frog"]
    ll = s.class_scores(x, names)
    assert ll.shape == (3, 3) and torch.isfinite(ll).all() and (ll < 0).all()
    # independent path: HF's own shifted cross-entropy on the class tokens only
    q = s.query_embeds(x)
    p_ids = tok(["This is a photo of a"])["input_ids"][0]
    emb = model.language_model.get_input_embeddings()
    for c, name in enumerate(names):
        if lm == "opt":
            c_ids = tok([" " + name])["input_ids"][0]
            ids = torch.tensor(p_ids + c_ids)
            inp = torch.cat([q, emb(ids).unsqueeze(0).expand(3, -1, -1)], 1)
            labels = torch.full((3, inp.shape[1]), -100)
            labels[:, -len(c_ids):] = torch.tensor(c_ids)
            loss = [model.language_model(inputs_embeds=inp[i:i + 1], labels=labels[i:i + 1]).loss for i in range(3)]
        else:
            c_ids = tok([name])["input_ids"][0]
            inp = torch.cat([q, emb(torch.tensor(p_ids)).unsqueeze(0).expand(3, -1, -1)], 1)
            labels = torch.tensor(c_ids).unsqueeze(0)
            loss = [model.language_model(inputs_embeds=inp[i:i + 1], labels=labels).loss for i in range(3)]
        assert torch.allclose(ll[:, c], -torch.stack(loss), atol=1e-4)
    # the task loss is the true class's negative mean log-likelihood; gradients reach the pixels only
    labels = torch.tensor([2, 0, 1])
    xg = x.clone().requires_grad_(True)
    loss = s.task_loss(xg, labels, names)
    assert loss.item() == pytest.approx(-ll[torch.arange(3), labels].mean().item(), rel=1e-4)
    loss.backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert s.embed(x).shape == (3, 4, model.config.text_config.hidden_size if lm == "opt" else 32)


def test_make_scorer_dispatch_and_errors():
    model, tok = tiny_blip2("opt")

    class Wrapper(torch.nn.Module):  # a backbone wrapper exposing .model and .tokenizer
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.image_size = model, tok, 16

    assert isinstance(make_scorer(Wrapper()), BLIP2Scorer)

    class NoTok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

    with pytest.raises(ScorerError, match="no tokenizer"):
        make_scorer(NoTok())
    with pytest.raises(ScorerError, match="no zero-shot scorer for Linear"):
        make_scorer(torch.nn.Linear(2, 2))
    with pytest.raises(ScorerError, match="has no 'vision_model'"):
        BLIP2Scorer(torch.nn.Linear(2, 2), tok)


# ---------------------------------------------------------------------------- the matrix
def _spec(tmp_path, **over):
    import yaml

    spec = {"models": {"a": "zoo_clip", "b": "zoo_clip_p8"}, "data": ["synth_count"],
            "methods": {"vp": {}, "tvp": {"fca": 0.01, "tse": 0.01}}, "seeds": [0, 1], "epochs": 1,
            "weights": "random", "max_test": 12, "trainer": {"limit_train_batches": 1}, "batch_size": 8}
    spec.update(over)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"transfer": spec}))
    return path


def test_run_transfer_writes_matrix_table_heatmap_and_is_resumable(tmp_path):
    from prompttune.methods.tvp import load_prompt
    from prompttune.transfer import run_transfer

    out = tmp_path / "out"
    res = run_transfer(_spec(tmp_path), out)
    rows = list(csv.DictReader((out / "transfer_matrix.csv").open()))
    assert len(rows) == 1 * 2 * 2 * 2 * 2  # data x methods x sources x targets x seeds
    assert {(r["source"], r["target"]) for r in rows} == {("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")}
    for r in rows:
        assert float(r["gain"]) == pytest.approx(float(r["acc_prompt"]) - float(r["acc_clean"]), abs=1e-3)
    md = (out / "transfer_matrix.md").read_text()
    assert "TVP transfers" in md and "| source \\ target | a | b |" in md
    assert (out / "transfer_matrix.png").stat().st_size > 1000
    p = load_prompt(out / "prompts" / "synth_count" / "tvp" / "b-s1.pth", canvas_size=32)
    assert p[:, 4:28, 4:28].abs().sum() == 0 and p.abs().sum() > 0
    # resumable: a second call reuses every record and trains nothing
    rec = out / "records" / "synth_count__vp__a__s0.json"
    stamp = rec.stat().st_mtime_ns
    res2 = run_transfer(_spec(tmp_path), out)
    assert rec.stat().st_mtime_ns == stamp
    assert res2["rows"] == res["rows"]


def test_summary_and_verdict_from_hand_made_rows():
    from prompttune.transfer import summarise, verdict

    spec = {"data": ["d"], "methods": {"vp": {}, "tvp": {}}, "seeds": [0, 1]}
    rows = []
    for m, off in (("vp", [0.0, 0.02]), ("tvp", [0.04, 0.10])):
        for seed in (0, 1):
            for s in ("a", "b"):
                for t in ("a", "b"):
                    rows.append({"data": "d", "method": m, "seed": seed, "source": s, "target": t,
                                 "gain": 0.3 if s == t else off[seed]})
    sm = summarise(rows, spec)
    assert sm["d"]["vp"]["self"]["mean"] == pytest.approx(0.3)
    assert sm["d"]["tvp"]["transfer"]["mean"] == pytest.approx(0.07)
    d = sm["d"]["tvp_minus_vp_transfer"]
    assert d["per_seed"] == pytest.approx([0.04, 0.08]) and d["wins"] == 2
    text = verdict(sm, "d")
    assert "TVP transfers better than VP" in text and "+6.0 ± 2.8" in text and "every seed" in text
    d.update(mean=0.0001, std=0.0, wins=1)  # ahead in a seed, but by nothing visible
    assert "TVP transfers no differently than VP" in verdict(sm, "d")
    d.update(mean=-0.01, std=0.03)  # behind on average, within the spread
    assert "no differently" in verdict(sm, "d")


@pytest.mark.parametrize("over,msg", [
    ({"modelz": {}}, "unknown transfer key"),
    ({"models": {"a": "zoo_clip_nope"}}, "zoo_clip_nope"),
    ({"targets": ["c"]}, "transfer.targets names"),
    ({"data": ["synth_counting"]}, "synth_counting"),
    ({"methods": {"vpp": {}}}, "vpp"),
    ({"seeds": [-1]}, "seeds"),
    ({"methods": {"tvp": {"fcaa": 1.0}}}, "fcaa"),
])
def test_bad_specs_fail_before_compute(tmp_path, over, msg):
    from prompttune.transfer import run_transfer

    with pytest.raises(ConfigError, match=msg):
        run_transfer(_spec(tmp_path, **over), tmp_path / "out")
    assert not (tmp_path / "out" / "records").exists() or not any((tmp_path / "out" / "records").iterdir())
