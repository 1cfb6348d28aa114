"""The competence probes that zoo bars read, on tiny inputs (no zoo build)."""

import pytest
import torch

from prompttune.zoo._probe import ridge_probe_accuracy


def test_ridge_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 32, generator=g) * 3
    y_train, y_test = torch.arange(16).repeat(24), torch.arange(16).repeat(24)
    x_train = centres[y_train] + torch.randn(len(y_train), 32, generator=g)
    x_test = centres[y_test] + torch.randn(len(y_test), 32, generator=g)
    assert ridge_probe_accuracy(x_train, y_train, x_test, y_test) > 0.95
    noise = torch.randn(len(y_test), 32, generator=g)
    assert ridge_probe_accuracy(torch.randn(len(y_train), 32, generator=g), y_train, noise, y_test) < 0.2


def _tiny_blip2_data():
    from prompttune.backbones.blip2 import make_tiny_blip2, make_world_tokenizer

    torch.manual_seed(0)
    unit = make_tiny_blip2().eval()
    tok = make_world_tokenizer()
    prompts = ["a photo of", "what color is the object ?", "a photo of"]
    targets = ["a red disc", "red", "two blue squares"]
    p = tok(prompts, padding="longest", add_special_tokens=False, return_tensors="pt")
    t = tok([x + tok.eos_token for x in targets], padding="longest", add_special_tokens=False, return_tensors="pt")
    pix = torch.randn(2, 3, 32, 32)
    data = (pix, p, t, torch.tensor([0, 1, 0]))
    return unit, tok, data


def test_interleaved_batch_places_every_target_and_marks_the_last_segment():
    from prompttune.backbones.blip2 import EOC_TOKEN
    from prompttune.zoo.blip2_tiny import _interleaved_batch

    unit, tok, data = _tiny_blip2_data()
    bos, eoc = torch.tensor([tok.bos_token_id]), torch.tensor([tok.convert_tokens_to_ids(EOC_TOKEN)])
    with torch.no_grad():
        emb, mask, labels, last = _interleaved_batch(unit.blip2, unit.qformer_text_embeddings, data,
                                                     [[0], [1, 2]], bos, eoc)
    nq = unit.blip2.config.num_query_tokens
    p_len = data[1].attention_mask.sum(1).tolist()
    t_len = data[2].attention_mask.sum(1).tolist()
    row0 = nq + 1 + p_len[0] + t_len[0]
    row1 = (nq + 1 + p_len[1] + t_len[1] + 1) + (nq + 1 + p_len[2] + t_len[2])
    assert mask.sum(1).tolist() == [row0, row1] and emb.shape[:2] == (2, max(row0, row1))
    t_ids = data[2].input_ids
    assert labels[0][labels[0] != -100].tolist() == t_ids[0, :t_len[0]].tolist()
    both = t_ids[1, :t_len[1]].tolist() + t_ids[2, :t_len[2]].tolist()
    assert labels[1][labels[1] != -100].tolist() == both  # every segment's target is trained
    assert last[1][last[1] != -100].tolist() == t_ids[2, :t_len[2]].tolist()  # the probe scores the query only
    assert last[0].tolist() == labels[0].tolist()
    # the end-of-chunk embedding closes the first segment of row 1
    eoc_pos = nq + 1 + p_len[1] + t_len[1]
    assert torch.allclose(emb[1, eoc_pos], unit.blip2.get_input_embeddings()(eoc)[0])


def test_icl_competence_reports_bounded_ious_on_an_untrained_model():
    pytest.importorskip("PIL")
    from prompttune.backbones.mae_vqgan import make_model
    from prompttune.zoo.mae_vqgan_tiny import icl_competence

    torch.manual_seed(0)
    r = icl_competence(make_model("tiny"), seed=5, n=4)
    assert set(r) == {"label_recon_iou", "frozen_icl_iou", "label_fg_fraction"}
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert 0.05 < r["label_fg_fraction"] < 0.6  # the world's labels are neither empty nor full


def test_vq_probe_script_trains_the_zoo_entrys_tokenizer_step():
    """scripts/zoo_vq_probe.py reuses the entry's canvases and training step (no copy of its own):
    on the same seed it ends with the same tokenizer weights as ``train_tokenizer`` called directly."""
    pytest.importorskip("PIL")
    import importlib.util
    from pathlib import Path

    from prompttune.backbones.mae_vqgan import make_model
    from prompttune.data.canvas import CanvasGeometry
    from prompttune.zoo import mae_vqgan_tiny as entry

    script = Path(__file__).parents[1] / "scripts" / "zoo_vq_probe.py"
    spec = importlib.util.spec_from_file_location("zoo_vq_probe", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    seen = {}
    real = entry.train_tokenizer

    def spy(vq, *a, **kw):
        seen["vq"] = vq
        return real(vq, *a, **kw)

    probe.train_tokenizer = spy
    out = probe.run({"n_embed": 16, "steps": 3, "canvases": 8, "eval_n": 4, "evals": [2, 3]})
    assert [r["step"] for r in out] == [2, 3] and all(0.0 <= r["label_recon_iou"] <= 1.0 for r in out)
    torch.manual_seed(0)
    model = make_model("tiny", vq={"n_embed": 16}, mae={"vocab_size": 16})
    torch.manual_seed(0)
    canv, weight, _, _ = entry.training_canvases(CanvasGeometry(64, 8, 1), 8, 0, 3.0)
    real(model.vqgan, canv, weight, 3, schedule="onecycle")
    for k, v in model.vqgan.state_dict().items():
        assert torch.equal(v, seen["vq"].state_dict()[k]), k
    with pytest.raises(SystemExit, match="unknown probe key"):
        probe.run({"codes": 16})
    with pytest.raises(ValueError, match="schedule"):
        real(model.vqgan, canv, weight, 1, schedule="cosine")


def test_interleaved_batch_opens_each_caption_with_its_code_and_codes_follow_the_studio():
    """blip2-tiny v5's episodes: a code token opens a segment's target (input and label), studios
    share one code per sequence, VQA segments (studio -1) get none, and an episode holds at least
    one earlier segment of the query's studio."""
    from prompttune.backbones.blip2 import EOC_TOKEN
    from prompttune.zoo.blip2_tiny import _episode, _interleaved_batch, _sequence_codes

    unit, tok, data = _tiny_blip2_data()
    bos, eoc = torch.tensor([tok.bos_token_id]), torch.tensor([tok.convert_tokens_to_ids(EOC_TOKEN)])
    code = tok.convert_tokens_to_ids("5")
    with torch.no_grad():
        _, plain_mask, _, _ = _interleaved_batch(unit.blip2, unit.qformer_text_embeddings, data, [[1, 2]], bos, eoc)
        emb, mask, labels, last = _interleaved_batch(unit.blip2, unit.qformer_text_embeddings, data, [[1, 2]],
                                                     bos, eoc, codes=[[code, None]])
    t_ids, t_len = data[2].input_ids, data[2].attention_mask.sum(1).tolist()
    assert labels[0][labels[0] != -100].tolist() == [code] + t_ids[1, :t_len[1]].tolist() + t_ids[2, :t_len[2]].tolist()
    assert int(mask.sum()) == int(plain_mask.sum()) + 1  # one token more: the code
    nq, lp = unit.blip2.config.num_query_tokens, int(data[1].attention_mask[1].sum())
    assert torch.allclose(emb[0, nq + 1 + lp], unit.blip2.get_input_embeddings()(torch.tensor([code]))[0])
    assert last[0][last[0] != -100].tolist() == t_ids[2, :t_len[2]].tolist()

    studios = [0, 0, 3, -1]
    g = torch.Generator().manual_seed(0)
    codes = _sequence_codes([[0, 1, 2, 3]] * 50, studios, [10, 11, 12, 13, 14, 15, 16], g)
    assert all(c[0] == c[1] and c[3] is None for c in codes)
    assert len({c[0] for c in codes}) > 1 and any(c[0] != c[2] for c in codes)  # fresh per sequence
    for _ in range(20):
        ep = _episode(9, 3, [5, 6], list(range(20)), g, p_same=0.0)
        assert ep[-1] == 9 and len(ep) == 4 and any(i in (5, 6) for i in ep[:-1])


def test_clip_pretraining_on_the_used_vocabulary_matches_the_full_table(tmp_path, monkeypatch):
    """pretrain_clip trains only the token rows the captions use (compact_vocab); the model it
    returns must be the one the full 49408-row table gives: every other weight bitwise, the
    embedding to float rounding (rows never looked up only decay), and the full table restored."""
    import open_clip

    import prompttune.zoo.clip_tiny as ct

    monkeypatch.setenv("PROMPTTUNE_HOME", str(tmp_path))
    monkeypatch.setattr(ct, "clip_competence", lambda model: {})
    cfg = dict(ct.TINY_CLIP, embed_dim=16,
               vision_cfg=dict(ct.TINY_CLIP["vision_cfg"], layers=1, width=32, head_width=16),
               text_cfg=dict(ct.TINY_CLIP["text_cfg"], layers=1, width=32, heads=2))
    states = {}
    for compact in (False, True):
        torch.manual_seed(0)
        model = open_clip.CLIP(**cfg)
        init = model.token_embedding.weight.detach().clone()
        ct.pretrain_clip(model, tmp_path / f"m{compact}", n=128, epochs=1, batch_size=64, p_template=0.5,
                         compact_vocab=compact)
        assert model.token_embedding.num_embeddings == 49408
        states[compact] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full, small = states[False], states[True]
    for k in full:
        if k != "token_embedding.weight":
            assert torch.equal(full[k], small[k]), k
    moved = (full["token_embedding.weight"] - init).abs().amax(1) > 1e-3   # the rows the captions use
    assert 20 < int(moved.sum()) < 1000
    torch.testing.assert_close(small["token_embedding.weight"], full["token_embedding.weight"], rtol=0, atol=1e-6)


def test_clip_pretraining_captions_name_attributes_at_the_recipes_share(tmp_path, monkeypatch):
    """clip-tiny v4 names colour and size in 30 % of its pretraining captions (v3: 70 %): the share
    reaches the caption writer, and each share has its own cache root, so a v3 cache is never
    read as v4's."""
    import prompttune.zoo.clip_tiny as ct
    from prompttune.data.captions import read_caption_csv
    from prompttune.data.world import SIZES

    monkeypatch.setenv("PROMPTTUNE_HOME", str(tmp_path))
    seen = {}

    def stop(*a, **k):  # the captions are all this test needs: stop before any training
        raise StopIteration

    monkeypatch.setattr(ct, "clip_competence", lambda model: {})
    monkeypatch.setattr(ct.torch.optim, "AdamW", stop)
    for share in (0.3, 0.7):
        with pytest.raises(StopIteration):
            ct.pretrain_clip(ct.make_tiny_clip(), tmp_path / "m", n=400, epochs=1, p_attributes=share)
        root = tmp_path / "data" / ("world-captions-400-s0" + ("" if share == 0.7 else "-a0.3"))
        caps = [c for _, c in read_caption_csv(root / "captions.csv")]
        seen[share] = sum(c.split()[1] in SIZES for c in caps) / len(caps)
    assert abs(seen[0.3] - 0.3) < 0.07 and abs(seen[0.7] - 0.7) < 0.07, seen
    entry = ct.zoo.get("clip-tiny")
    assert entry.version == "4" and entry.pretrain.keywords["p_attributes"] == 0.3
