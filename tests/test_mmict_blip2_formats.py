"""BLIP-2 conventions MMICT depends on, on tiny models saved in the real formats:
the Q-Former text path from a LAVIS checkpoint or from BERT (never random silently), [CLS]/[SEP]
around the Q-Former text, ``</s>`` at the end of Flan-T5 prompts (HF parity), the squash resize,
and the pre-``ln_vision`` ViT tokens."""

import pytest
import torch

from prompttune.backbones.blip2 import Blip2Backbone, make_world_tokenizer, run_qformer, tiny_blip2_config
from prompttune.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:.*start random:UserWarning")


def t5_style_tokenizer():
    """The world tokenizer with T5TokenizerFast's post-processor: ``add_special_tokens`` appends ``</s>``."""
    from tokenizers.processors import TemplateProcessing

    tok = make_world_tokenizer()
    eos = tok.convert_tokens_to_ids("</s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                              special_tokens=[("</s>", eos)])
    return tok


def bert_tokenizer(folder):
    """A bert-base-uncased-style WordPiece tokenizer (vocab.txt) over some world words."""
    from transformers import BertTokenizerFast

    words = [w for w in make_world_tokenizer().get_vocab() if not w.startswith("<")]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)[:70]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def released_blip2(folder, lm="opt"):
    """A BLIP-2 saved as HF releases it: the Q-Former without its text path, no text embeddings file."""
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    cfg = tiny_blip2_config(lm=lm)
    cfg.qformer_config.use_qformer_text_input = False
    model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    model.save_pretrained(folder)
    (t5_style_tokenizer() if lm == "t5" else make_world_tokenizer()).save_pretrained(folder)
    return model


def lavis_state(model, seed=1):
    """A LAVIS-style BLIP-2 state dict: the Q-Former under ``Qformer.bert.*`` incl. the text path."""
    g = torch.Generator().manual_seed(seed)
    q = model.config.qformer_config
    sd = {"query_tokens": model.query_tokens.detach().clone(),
          "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(q.vocab_size + 1, q.hidden_size, generator=g),
          "Qformer.bert.embeddings.position_embeddings.weight": torch.randn(512, q.hidden_size, generator=g),
          "Qformer.bert.embeddings.LayerNorm.weight": torch.ones(q.hidden_size)}
    for i in range(q.num_hidden_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        sd[p + "intermediate.dense.weight"] = torch.randn(q.intermediate_size, q.hidden_size, generator=g)
        sd[p + "intermediate.dense.bias"] = torch.randn(q.intermediate_size, generator=g)
        sd[p + "output.dense.weight"] = torch.randn(q.hidden_size, q.intermediate_size, generator=g)
        sd[p + "output.dense.bias"] = torch.randn(q.hidden_size, generator=g)
        sd[p + "output.LayerNorm.weight"] = torch.rand(q.hidden_size, generator=g) + 0.5
        sd[p + "output.LayerNorm.bias"] = torch.randn(q.hidden_size, generator=g)
    return sd


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip2-released")
    return folder, released_blip2(folder)


# ---------------------------------------------------------------------------- item 6: Q-Former text path
def test_released_weights_never_start_the_text_path_at_random_silently(released, tmp_path):
    from prompttune.methods.mhub import MHub
    from prompttune.methods.mmict_baselines import VanillaICT

    folder, _ = released
    bb = Blip2Backbone(model=str(folder))
    assert bb.qformer_text_source == "missing"
    with pytest.raises(ConfigError, match="no Q-Former word/position embeddings or text feed-forward.*"
                                          "qformer_text_from.*LAVIS.*bert-base-uncased.*qformer_text_random"):
        MHub(k=0).setup(bb, None)
    VanillaICT(k=0).setup(bb, None)  # never feeds text to the Q-Former: fine
    with pytest.warns(UserWarning, match="start random"):
        rnd = Blip2Backbone(model=str(folder), qformer_text_random=True)
    assert rnd.qformer_text_source == "random"
    MHub(k=0).setup(rnd, None)


def test_text_path_from_a_lavis_checkpoint(released, tmp_path):
    folder, model = released
    sd = lavis_state(model)
    torch.save({"model": sd, "config": {"arch": "blip2_opt"}}, tmp_path / "blip2_pretrained.pth")
    bb = Blip2Backbone(model=str(folder), qformer_text_from=str(tmp_path / "blip2_pretrained.pth"))
    assert bb.qformer_text_source == "lavis:blip2_pretrained.pth"
    emb = bb.qformer_text_embeddings
    assert torch.equal(emb.word_embeddings.weight, sd["Qformer.bert.embeddings.word_embeddings.weight"])
    assert emb.word_embeddings.num_embeddings == model.config.qformer_config.vocab_size + 1  # LAVIS adds [DEC]
    assert torch.equal(emb.position_embeddings.weight, sd["Qformer.bert.embeddings.position_embeddings.weight"])
    for i, layer in enumerate(bb.qformer.encoder.layer):
        p = f"Qformer.bert.encoder.layer.{i}."
        assert torch.equal(layer.intermediate.dense.weight, sd[p + "intermediate.dense.weight"])
        assert torch.equal(layer.output.LayerNorm.bias, sd[p + "output.LayerNorm.bias"])
        assert not layer.intermediate.dense.weight.requires_grad  # part of the frozen backbone
    # the text path is what the Q-Former's text positions now compute with
    x = torch.randn(1, 3, 32, 32)
    ids, m = bb.tokenize(["a red disc"], qformer=True)
    out = run_qformer(bb.qformer, bb.query_tokens, bb.encode_images(x), bb.qformer_text_embeddings, ids, m)
    with torch.no_grad():
        bb.qformer.encoder.layer[-1].intermediate.dense.weight.mul_(2.0)
    out2 = run_qformer(bb.qformer, bb.query_tokens, bb.encode_images(x), bb.qformer_text_embeddings, ids, m)
    assert torch.allclose(out[:, :8], out2[:, :8]) and not torch.allclose(out[:, 8:], out2[:, 8:])
    # the method's hub is a copy of exactly these weights (no query-FFN substitute)
    from prompttune.methods.mhub import MHub

    hub = MHub(k=0)
    hub.setup(bb, None)
    assert torch.equal(hub.hub.encoder.layer[0].intermediate.dense.weight,
                       sd["Qformer.bert.encoder.layer.0.intermediate.dense.weight"])
    # save_blip2 keeps the loaded text path: the folder reloads with it (embeddings sized as LAVIS's)
    from prompttune.backbones.blip2 import Blip2WithQFormerText, save_blip2

    save_blip2(Blip2WithQFormerText(bb.model, bb.qformer_text_embeddings), bb.tokenizer, tmp_path / "saved")
    again = Blip2Backbone(model=str(tmp_path / "saved"))
    assert again.qformer_text_source == "folder"
    ids, m = again.tokenize(["a red disc"], qformer=True)
    same = run_qformer(again.qformer, again.query_tokens, again.encode_images(x), again.qformer_text_embeddings, ids, m)
    assert torch.allclose(same, out2, atol=1e-5)
    # a bare state dict (no "model" wrapper) is read too; a checkpoint without the text path is refused
    torch.save({k: v for k, v in sd.items() if "word_embeddings" not in k}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="no 'Qformer.bert.embeddings.word_embeddings.weight'"):
        Blip2Backbone(model=str(folder), qformer_text_from=str(tmp_path / "partial.pth"))


def test_text_path_from_bert_through_transformers(released, tmp_path):
    from transformers import BertConfig, BertModel

    folder, model = released
    q = model.config.qformer_config
    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=80, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                                num_attention_heads=4, intermediate_size=q.intermediate_size,
                                max_position_embeddings=128))
    bert.save_pretrained(tmp_path / "bert")
    tok = bert_tokenizer(tmp_path / "bert")
    bb = Blip2Backbone(model=str(folder), qformer_text_from=str(tmp_path / "bert"),
                       qformer_tokenizer=str(tmp_path / "bert"))
    assert bb.qformer_text_source.startswith("bert:")
    assert torch.equal(bb.qformer_text_embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert torch.equal(bb.qformer.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)
    # [CLS] ... [SEP] around the Q-Former text, as LAVIS's BertTokenizer call adds them
    ids, m = bb.tokenize(["a red disc", "a cross"], qformer=True)
    assert ids[0, 0] == tok.cls_token_id and ids[0, int(m[0].sum()) - 1] == tok.sep_token_id
    assert ids[1, int(m[1].sum()) - 1] == tok.sep_token_id and ids[1, -1] == tok.pad_token_id
    # ... while the LM's own tokenisation of the same text adds nothing
    lm_ids, _ = bb.tokenize(["a red disc"])
    assert lm_ids.shape[1] == 3
    small = BertModel(BertConfig(vocab_size=80, hidden_size=q.hidden_size, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=q.intermediate_size))
    small.save_pretrained(tmp_path / "bert1")
    with pytest.raises(ValueError, match="the BERT model has 1 layers; the Q-Former needs 2"):
        Blip2Backbone(model=str(folder), qformer_text_from=str(tmp_path / "bert1"))
    with pytest.raises(ValueError, match="neither a LAVIS checkpoint file nor a BERT model"):
        Blip2Backbone(model=str(folder), qformer_text_from=str(tmp_path / "nothing-here"))


# ---------------------------------------------------------------------------- item 7: </s> on Flan-T5 prompts
def test_flan_t5_prompt_ends_with_eos_and_matches_hf_forward(tmp_path):
    """HF's processor tokenises a Flan-T5 prompt with its special tokens (``... </s>``); our prefix
    [queries, prompt ids] must give the same LM logits as HF's forward over those input_ids."""
    folder = tmp_path / "t5"
    released_blip2(folder, lm="t5")
    bb = Blip2Backbone(model=str(folder), qformer_text_random=True)
    tok = bb.tokenizer
    prompt = ["a photo of", "a photo of"]
    hf_tok = tok(prompt).input_ids  # what Blip2Processor gives (add_special_tokens=True)
    assert hf_tok[0][-1] == tok.eos_token_id
    ids, m = bb.prompt_ids(prompt)
    assert ids.tolist() == hf_tok and m.all()  # one </s>, not two
    # the world tokenizer (no post-processor) gets its </s> from prompt_ids as well
    plain = Blip2Backbone(model=str(folder), qformer_text_random=True)
    plain.tokenizer = make_world_tokenizer()
    pid, pm = plain.prompt_ids(["a photo of", "a red striped disc"])
    assert pid[0, int(pm[0].sum()) - 1] == plain.tokenizer.eos_token_id and int(pm[0].sum()) == 4
    assert pid[1, 4] == plain.tokenizer.eos_token_id and int(pm[1].sum()) == 5
    x = torch.randn(2, 3, 32, 32)
    hf_ids = torch.cat([torch.full((2, bb.num_query_tokens), bb.model.config.image_token_id), torch.tensor(hf_tok)], 1)
    assert torch.equal(bb.hf_prompt_ids(prompt), hf_ids)
    dec = torch.tensor([[tok.pad_token_id, 5, 6], [tok.pad_token_id, 7, 8]])
    with torch.no_grad():
        hf = bb.model(pixel_values=x, input_ids=hf_ids, decoder_input_ids=dec).logits
        vis = bb.language_projection(run_qformer(bb.qformer, bb.query_tokens, bb.encode_images(x)))
        prefix = torch.cat([vis, bb.lm_embed(ids)], 1)
        ours = bb.language_model(inputs_embeds=prefix, decoder_input_ids=dec).logits
        no_eos = bb.language_model(inputs_embeds=prefix[:, :-1], decoder_input_ids=dec).logits
    assert torch.allclose(hf, ours, atol=1e-5)
    assert not torch.allclose(hf, no_eos, atol=1e-3)  # the omission this pins


# ---------------------------------------------------------------------------- item 8: squash resize
def test_squash_resize_keeps_the_whole_640x480_image():
    import numpy as np
    from PIL import Image

    from prompttune.data.coco_captions import SquashTransform

    arr = np.zeros((480, 640, 3), dtype=np.uint8)
    arr[:, :80] = (255, 0, 0)  # the left eighth: a centre crop of the shorter side would drop it
    arr[:, -80:] = (0, 0, 255)
    img = Image.fromarray(arr)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x = SquashTransform(32, mean, std)(img)
    assert x.shape == (3, 32, 32)
    expect = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    assert torch.allclose(x, (torch.from_numpy(expect).permute(2, 0, 1) - 0.5) / 0.5, atol=1e-6)
    assert x[0, :, 0].mean() > 0.9 and x[2, :, -1].mean() > 0.9  # both edge stripes survive
    aug = SquashTransform(32, mean, std, augment=True, seed=0)
    assert aug(img).shape == (3, 32, 32)


def test_datamodule_uses_the_squash_transform(tmp_path):
    from prompttune.data.coco_captions import CocoCaptionsDataModule, SquashTransform

    dm = CocoCaptionsDataModule(root=str(tmp_path))
    dm.image_size = 32
    assert isinstance(dm.transform("test"), SquashTransform) and not dm.transform("train").augment


# ---------------------------------------------------------------------------- item 13: ln_vision
def test_pre_ln_tokens_and_a_trained_ln_vision(released):
    from prompttune.methods.mhub import MHub

    folder, _ = released
    bb = Blip2Backbone(model=str(folder), qformer_text_random=True)
    x = torch.randn(2, 3, 32, 32)
    pre = bb.encode_images(x, pre_ln=True)
    assert torch.allclose(bb.ln_vision(pre), bb.encode_images(x), atol=1e-6)
    assert bb.encode_images(torch.randn(2, 3, 3, 32, 32), pre_ln=True).shape == (2, 3 * 17, 64)
    m = MHub(k=0, train_ln_vision=True)
    m.setup(bb, None)
    assert m.ln_vision is not bb.ln_vision and torch.equal(m.ln_vision.weight, bb.ln_vision.weight)
    feats, pooled = m.vision_tokens(bb, x)
    assert torch.allclose(feats, bb.encode_images(x), atol=1e-6) and torch.allclose(pooled, bb.encode_images(x).mean(1))
    m.train()
    batch = {"image": x, "prompt": ["a photo of"] * 2, "target": ["a red disc", "a cross"], "index": torch.arange(2)}
    m(bb, batch)["loss"].backward()
    assert m.ln_vision.weight.grad is not None and m.ln_vision.weight.grad.abs().sum() > 0
    assert "ln_vision.weight" in m.trainable_state() and bb.ln_vision.weight.grad is None
