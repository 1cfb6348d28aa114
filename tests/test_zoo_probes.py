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
