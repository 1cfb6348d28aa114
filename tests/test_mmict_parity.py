"""The M-Hub and vanilla-ICT losses against a transcription of the official MMICT forward
(KDEGroup/MMICT @ 3128e3b, ``lavis/models/blip2_models/blip2_t5.py``, ``Blip2T5.forward``, lines
137-344), written here with the HF modules LAVIS's correspond to (``Qformer.bert`` ->
``Blip2TextEmbeddings`` + ``Blip2QFormerModel``; ``ln_vision`` -> ``post_layernorm``), on a tiny
Flan-T5 BLIP-2 with a BERT-style Q-Former tokenizer and a T5-style LM tokenizer, with the official
switches: bare-caption demonstrations, demonstration features padded to the batch's longest
text, a trained ``ln_vision``, ``</s>``-terminated prompts, [CLS]/[SEP] Q-Former text."""

import copy

import pytest
import torch

from prompttune.backbones.blip2 import EOC_TOKEN, Blip2Backbone, make_tiny_blip2, save_blip2
from prompttune.methods.mhub import MHub
from prompttune.methods.mmict_baselines import VanillaICT
from test_mmict_blip2_formats import bert_tokenizer, t5_style_tokenizer

PROMPT = "a photo of"


def official_forward(model, text_emb, ln_vision, bert_tok, t5_tok, samples, prompt, instruct_qformer=True,
                     max_txt_len=32):
    """blip2_t5.py:137-344, transcribed (self.* -> arguments; autocast contexts dropped)."""
    query_tokens_param = model.query_tokens
    # --- grouping (blip2_t5.py:141-173)
    group_index, group_index_i, group_index_ii = [], [], [0]
    text_index, text_index_i = [], []
    if samples["text_input"][0] != "none":
        text_index_i.append(0)
        group_index_i.append(group_index_ii)
        group_index_ii = []
    for dialog_id_i in range(1, len(samples["dialog_id"])):
        if samples["dialog_id"][dialog_id_i] == samples["dialog_id"][dialog_id_i - 1]:
            group_index_ii.append(dialog_id_i)
            if samples["text_input"][dialog_id_i] != "none":
                text_index_i.append(dialog_id_i)
                group_index_i.append(group_index_ii)
                group_index_ii = []
        else:
            group_index.append(group_index_i)
            text_index.append(text_index_i)
            if samples["dialog_id"][dialog_id_i] == -1:
                group_index_i = []
                break
            group_index_ii = [dialog_id_i]
            group_index_i = []
            text_index_i = []
            if samples["text_input"][dialog_id_i] != "none":
                text_index_i.append(dialog_id_i)
                group_index_i.append(group_index_ii)
                group_index_ii = []
    if group_index_i:
        group_index.append(group_index_i)
        text_index.append(text_index_i)
    group_num = len(group_index)
    # --- split the query's caption (blip2_t5.py:175-180; split_caption with a str prompt, :133-134)
    samples["text_output"] = []
    for gi in range(group_num):
        caption = samples["text_input"][group_index[gi][-1][-1]]
        caption_pre, caption_suf = prompt, caption
        samples["text_input"][group_index[gi][-1][-1]] = caption_pre
        samples["text_output"].append(caption_suf)
    # --- vision (blip2_t5.py:183-200): ln_vision(visual_encoder(image))
    image = samples["image"]
    vm = model.vision_model
    image_embeds = ln_vision(vm.encoder(inputs_embeds=vm.embeddings(image)).last_hidden_state)
    img_embeds_list, text_input_list = [], []
    for i in range(group_num):
        for j in range(len(group_index[i])):
            img_embeds_i = []
            for k in group_index[i][j]:
                img_embeds_i.append(image_embeds[k])
                if samples["text_input"][k] != "none":
                    text_input_list.append(samples["text_input"][k])
            img_embeds_list.append(torch.stack(img_embeds_i))
    samples["text_input"] = text_input_list
    # --- Q-Former per item (blip2_t5.py:211-257)
    if instruct_qformer:
        text_Qformer = bert_tok(samples["text_input"], padding="longest", truncation=True, max_length=max_txt_len,
                                return_tensors="pt")
    query_output_list = []
    for i in range(len(img_embeds_list)):
        img_embeds_i = img_embeds_list[i].reshape(1, -1, img_embeds_list[i].shape[-1])  # rearrange "b v d -> 1 (b v) d"
        image_atts_i = torch.ones(img_embeds_i.size()[:-1], dtype=torch.long)
        query_tokens = query_tokens_param
        nq = query_tokens.shape[1]
        if instruct_qformer:
            query_atts = torch.ones(query_tokens.size()[:-1], dtype=torch.long)
            Qformer_atts = torch.cat([query_atts, text_Qformer.attention_mask[i].unsqueeze(0)], dim=1)
            # Qformer.bert(input_ids, attention_mask, query_embeds, encoder_hidden_states, ...)
            emb = text_emb(input_ids=text_Qformer.input_ids[i].unsqueeze(0), query_embeds=query_tokens)
            out = model.qformer(query_embeds=emb, query_length=nq, attention_mask=Qformer_atts,
                                encoder_hidden_states=img_embeds_i, encoder_attention_mask=image_atts_i)
        else:
            out = model.qformer(query_embeds=query_tokens, query_length=nq, encoder_hidden_states=img_embeds_i,
                                encoder_attention_mask=image_atts_i)
        query_output_list.append(out.last_hidden_state)
    query_output = torch.cat(query_output_list, dim=0)
    inputs_t5 = model.language_projection(query_output)
    atts_t5 = torch.ones(inputs_t5.size()[:-1], dtype=torch.long)
    # --- T5 (blip2_t5.py:263-344)
    t5 = model.language_model
    input_tokens = t5_tok(samples["text_input"], padding="longest", truncation=True, max_length=max_txt_len,
                          return_tensors="pt")
    output_tokens = t5_tok(samples["text_output"], padding="longest", truncation=True, max_length=max_txt_len,
                           return_tensors="pt")
    targets = output_tokens.input_ids.masked_fill(output_tokens.input_ids == t5_tok.pad_token_id, -100)
    embed_tokens = t5.get_input_embeddings()
    all_inputs_embeds = embed_tokens(input_tokens.input_ids)
    eoc_id = t5_tok(EOC_TOKEN, add_special_tokens=False)["input_ids"][-1]
    eoc_embed = embed_tokens(torch.tensor(eoc_id)).unsqueeze(0)
    eoc_att = torch.ones(1, dtype=torch.long)
    inputs_embeds_list, encoder_atts_list = [], []
    start_index = 0
    for gi in range(group_num):
        inputs_embeds_i, encoder_atts_i = [], []
        for gj in range(len(group_index[gi])):
            if instruct_qformer:
                if gj == len(group_index[gi]) - 1:
                    inputs_embeds_i.append(inputs_t5[start_index + gj, :nq])
                    encoder_atts_i.append(atts_t5[start_index + gj, :nq])
                    inputs_embeds_i.append(all_inputs_embeds[start_index + gj])
                    encoder_atts_i.append(input_tokens.attention_mask[start_index + gj])
                else:
                    inputs_embeds_i.append(inputs_t5[start_index + gj, nq:])
                    encoder_atts_i.append(atts_t5[start_index + gj, nq:])
            else:
                inputs_embeds_i.append(inputs_t5[start_index + gj])
                encoder_atts_i.append(atts_t5[start_index + gj])
                inputs_embeds_i.append(all_inputs_embeds[start_index + gj])
                encoder_atts_i.append(input_tokens.attention_mask[start_index + gj])
            if gj != len(group_index[gi]) - 1:
                inputs_embeds_i.append(copy.deepcopy(eoc_embed))
                encoder_atts_i.append(copy.deepcopy(eoc_att))
        inputs_embeds_list.append(torch.cat(inputs_embeds_i, dim=0).unsqueeze(0))
        encoder_atts_list.append(torch.cat(encoder_atts_i, dim=0).unsqueeze(0))
        start_index += len(group_index[gi])
    inputs_embeds = torch.cat(inputs_embeds_list, dim=0)
    encoder_atts = torch.cat(encoder_atts_list, dim=0)
    outputs = t5(inputs_embeds=inputs_embeds, attention_mask=encoder_atts,
                 decoder_attention_mask=output_tokens.attention_mask, labels=targets, return_dict=True)
    return outputs.loss / group_num * group_num  # (the official divides the summed fallback by group_num)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    unit = make_tiny_blip2("t5")
    with torch.no_grad():  # a non-trivial ln_vision, so training it is visible
        unit.blip2.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
    t5_tok = t5_style_tokenizer()
    save_blip2(unit, t5_tok, root / "blip2")
    bert_tok = bert_tokenizer(root / "bert")
    bb = Blip2Backbone(model=str(root / "blip2"), qformer_tokenizer=str(root / "bert"))
    assert bb.qformer_text_source == "folder" and bb.is_encoder_decoder
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=g)
    # two groups of (2 demonstrations + query); demo captions of unequal lengths (padding matters)
    captions = ["a red striped disc", "a blue square", "a large green cross with dots",
                "a small disc", "a red square", "a blue cross"]
    return bb, bert_tok, t5_tok, images, captions


def _ours(method, bb, images, captions, k=2):
    method.setup(bb, None)
    method.k = k
    rows = [{"paths": [f"img{j}"], "prompt": PROMPT, "target": captions[j]} for j in range(len(captions))]
    method._pool_rows = rows
    groups = [[0, 1], [3, 4]]  # demonstration rows of queries 2 and 5
    method.select = lambda batch, pooled=None: groups
    method.demo_images = lambda flat, device: images[flat]
    batch = {"image": images[[2, 5]], "prompt": [PROMPT, PROMPT], "target": [captions[2], captions[5]],
             "index": torch.tensor([2, 5]), "split": ["train", "train"]}
    method.train()
    return method(bb, batch)["loss"]


def test_mhub_loss_equals_the_official_forward(setting):
    bb, bert_tok, t5_tok, images, captions = setting
    m = MHub(k=0, demo_text="target", demo_padding=True, train_ln_vision=True, max_text_len=32, seed=0)
    ours = _ours(m, bb, images, captions)
    samples = {"image": images, "text_input": list(captions), "dialog_id": [0, 0, 0, 1, 1, 1]}
    with torch.no_grad():
        official = official_forward(bb.model, bb.qformer_text_embeddings, bb.ln_vision, bert_tok, t5_tok, samples,
                                    PROMPT)
    assert ours.item() == pytest.approx(official.item(), abs=1e-5)
    # each prompttune switch away from the official behaviour changes the loss
    for kw in ({"demo_text": "prompt", "demo_padding": True}, {"demo_text": "target", "demo_padding": False}):
        other = _ours(MHub(k=0, train_ln_vision=True, max_text_len=32, seed=0, **kw), bb, images, captions)
        assert abs(other.item() - official.item()) > 1e-4, kw


def test_vanilla_ict_loss_equals_the_official_raw_feature_branch(setting):
    """``instruct_qformer: False``: every segment is its query outputs + the T5 embeddings of its text.
    Demonstration captions of equal token length here: the official keeps shorter captions' padding
    *inside* the sequence (masked), which prompttune drops (see docs/mmict.md)."""
    bb, bert_tok, t5_tok, images, _ = setting
    captions = ["a red disc", "a blue square", "a green cross", "a small disc", "a red square", "a blue cross"]
    m = VanillaICT(k=0, demo_text="target", train_ln_vision=True, max_text_len=32, seed=0)
    ours = _ours(m, bb, images, captions)
    samples = {"image": images, "text_input": list(captions), "dialog_id": [0, 0, 0, 1, 1, 1]}
    with torch.no_grad():
        official = official_forward(bb.model, bb.qformer_text_embeddings, bb.ln_vision, bert_tok, t5_tok, samples,
                                    PROMPT, instruct_qformer=False)
    assert ours.item() == pytest.approx(official.item(), abs=1e-5)
