"""The BLIP-2 backbone wrapper: frozen, real-format save/load, HF image-token consistency, hooks."""

import pytest
import torch

from prompttune.backbones.blip2 import (Blip2Backbone, make_tiny_blip2, make_world_tokenizer, run_qformer,
                                        save_blip2)


@pytest.fixture(scope="module")
def bb():
    return Blip2Backbone(zoo_entry="blip2-tiny", weights="random")


def test_frozen_and_in_eval(bb):
    assert all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.model.language_model.training
    assert bb.image_size == 32 and bb.num_query_tokens == 8 and not bb.is_encoder_decoder


def test_world_tokenizer_roundtrip_in_hf_format(tmp_path):
    from transformers import AutoTokenizer

    tok = make_world_tokenizer()
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    ids = back("A large Red striped disc <|endofchunk|>", add_special_tokens=False).input_ids
    assert ids == tok("a large red striped disc <|endofchunk|>", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.convert_tokens_to_ids("<|endofchunk|>")
    assert back.decode(ids, skip_special_tokens=True) == "a large red striped disc"


def test_save_pretrained_folder_loads_with_same_outputs(tmp_path, bb):
    save_blip2(type(make_tiny_blip2())(bb.model, bb.qformer_text_embeddings), bb.tokenizer, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "qformer_text_embeddings.safetensors").is_file()
    other = Blip2Backbone(model=str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(other.encode_images(x), bb.encode_images(x), atol=1e-6)
    ids, m = bb.tokenize(["what color is it ?"], qformer=True)
    a = run_qformer(bb.qformer, bb.query_tokens, bb.encode_images(x[:1]), bb.qformer_text_embeddings, ids, m)
    b = run_qformer(other.qformer, other.query_tokens, other.encode_images(x[:1]), other.qformer_text_embeddings, ids, m)
    assert torch.allclose(a, b, atol=1e-5)


def test_our_prefix_matches_hf_forward_with_image_tokens(bb):
    """transformers 5 scatters the projected queries into the image-token positions of input_ids;
    the prefix the methods compose ([queries, BOS, prompt]) must give the same LM logits."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    prompts = ["a photo of", "a photo of"]
    ids = bb.hf_prompt_ids(prompts)
    assert (ids[:, : bb.num_query_tokens] == bb.model.config.image_token_id).all()
    with torch.no_grad():
        hf = bb.model(pixel_values=x, input_ids=ids).logits
        vis = bb.language_projection(run_qformer(bb.qformer, bb.query_tokens, bb.encode_images(x)))
        prefix = torch.cat([vis, bb.bos_embedding().expand(2, 1, -1), bb.lm_embed(bb.tokenize(prompts)[0])], 1)
        ours = bb.language_model(inputs_embeds=prefix).logits
    assert torch.allclose(hf, ours, atol=1e-5)


def test_lm_loss_is_target_cross_entropy(bb):
    torch.manual_seed(0)
    prefix = torch.randn(1, 5, bb.lm_width)
    pm = torch.ones(1, 5, dtype=torch.long)
    t, tm = bb.tokenize(["a red disc"], add_eos=True)
    loss = bb.lm_loss(prefix, pm, t, tm)
    with torch.no_grad():
        logits = bb.language_model(inputs_embeds=torch.cat([prefix, bb.lm_embed(t)], 1)).logits[0]
    lp = logits.log_softmax(-1)
    by_hand = -torch.stack([lp[4 + i, t[0, i]] for i in range(t.shape[1])]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # left padding of the prefix does not change the loss (positions follow the attention mask)
    padded = torch.cat([torch.zeros(1, 3, bb.lm_width), prefix], 1)
    pmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), pm], 1)
    assert bb.lm_loss(padded, pmask, t, tm).item() == pytest.approx(loss.item(), rel=1e-4)


def test_generate_and_video_tokens(bb):
    prefix = torch.randn(2, 4, bb.lm_width)
    out = bb.lm_generate(prefix, torch.ones(2, 4, dtype=torch.long), max_new_tokens=3)
    assert len(out) == 2 and all(len(o.split()) <= 3 for o in out)
    assert bb.encode_images(torch.randn(2, 3, 3, 32, 32)).shape == (2, 3 * 17, 64)  # frames concatenated
    with pytest.raises(ValueError, match=r"images must be \[B,3,H,W\] or \[B,T,3,H,W\]"):
        bb.encode_images(torch.randn(3, 32, 32))


def test_t5_variant_runs():
    unit = make_tiny_blip2("t5")
    assert unit.blip2.config.use_decoder_only_language_model is False
    # the wrapper's hooks on an encoder-decoder LM: loss and generation
    bb = Blip2Backbone.__new__(Blip2Backbone)
    torch.nn.Module.__init__(bb)
    bb.model, bb.qformer_text_embeddings = unit.blip2, unit.qformer_text_embeddings
    bb.tokenizer = bb.qformer_tokenizer = make_world_tokenizer()
    bb.freeze()
    assert bb.is_encoder_decoder and bb.bos_embedding() is None
    prefix, pm = torch.randn(2, 5, bb.lm_width), torch.ones(2, 5, dtype=torch.long)
    t, tm = bb.tokenize(["a red disc", "a cross"], add_eos=True)
    assert torch.isfinite(bb.lm_loss(prefix, pm, t, tm))
    assert len(bb.lm_generate(prefix, pm, max_new_tokens=2)) == 2
    with pytest.raises(ValueError, match="must be 'opt' or 't5'"):
        make_tiny_blip2("llama")


def test_bad_backbone_arguments(tmp_path):
    with pytest.raises(ValueError, match="needs `zoo_entry`"):
        Blip2Backbone()
    with pytest.raises(ValueError, match="weights must be 'pretrained' or 'random'"):
        Blip2Backbone(zoo_entry="blip2-tiny", weights="imagenet")
    with pytest.raises(FileNotFoundError, match="not a save_pretrained folder: no config.json"):
        Blip2Backbone(model=str(tmp_path))


@pytest.mark.slow
def test_zoo_build_gives_an_image_grounded_model():
    """Builds blip2-tiny (~2-3 min on 2 cores): the Q-Former's outputs must depend on the image
    (a collapsed cross-attention -- the failure of too high a pretraining lr -- would not)."""
    from prompttune import zoo

    zoo.build("blip2-tiny")
    meta = zoo.get("blip2-tiny").meta.read_text()
    assert '"final_loss"' in meta
    bb = Blip2Backbone(zoo_entry="blip2-tiny")
    x = torch.randn(8, 3, 32, 32)
    q = run_qformer(bb.qformer, bb.query_tokens, bb.encode_images(x))
    assert q.std(0).mean() > 0.03
