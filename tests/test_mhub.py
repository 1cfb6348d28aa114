"""M-Hub and the MMICT baselines on a tiny random BLIP-2: ownership, gradients, format, selection."""

import pytest
import torch

from prompttune.backbones.blip2 import EOC_TOKEN, Blip2Backbone
from prompttune.data.coco_captions import CocoCaptionsDataModule
from prompttune.methods.mhub import MHub
from prompttune.methods.mmict_baselines import FineTuneQFormer, LoRALM, VanillaICT
from prompttune.registry import METHODS


@pytest.fixture(scope="module")
def bb():
    return Blip2Backbone(zoo_entry="blip2-tiny", weights="random")


@pytest.fixture(scope="module")
def dm(bb, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    d = CocoCaptionsDataModule(root=str(root), batch_size=4, eval_batch_size=3,
                               synthetic={"kind": "coco_captions", "n_train": 6, "n_val": 0, "n_test": 3, "seed": 1})
    d.configure_for(bb)
    d.check()
    d.setup()
    return d


def batches(dm):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return next(iter(dm.train_dataloader())), next(iter(dm.test_dataloader()))


@pytest.mark.parametrize("name,k", [("mhub", 2), ("ft_qformer", 0), ("vanilla_ict", 1), ("lora_lm", 1)])
def test_gradients_reach_exactly_the_method(bb, dm, name, k):
    m = METHODS.get(name)(k=k, seed=0)
    m.setup(bb, dm)
    own = {id(p) for p in m.parameters()}
    assert not own & {id(p) for p in bb.parameters()}  # its own copies, never the backbone's tensors
    assert all(not p.requires_grad for p in bb.parameters())
    train, _ = batches(dm)
    m.train()
    out = m(bb, train)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is None for p in bb.parameters())
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    if name == "lora_lm":  # B starts at zero, so only B gets a gradient on the first step (as in peft)
        no_grad = [n for n in no_grad if not n.endswith("lora_A")]
    if name == "ft_qformer":  # only query outputs are read: the last layer's text feed-forward is unused
        last = len(m.hub.encoder.layer) - 1
        unused = [n for n in no_grad if n.startswith(f"hub.encoder.layer.{last}.intermediate.")
                  or n.startswith(f"hub.encoder.layer.{last}.output.")]
        assert len(unused) == 6
        no_grad = [n for n in no_grad if n not in unused]
    assert not no_grad, f"trainable parameters without gradient: {no_grad[:5]}"
    state = m.trainable_state()
    assert not any("pool" in k for k in state)  # frozen demo features are never checkpointed
    if name != "lora_lm":
        assert any(k.startswith("hub.") for k in state) and "query_tokens" in state


def test_hub_is_a_copy_of_the_pretrained_qformer(bb, dm):
    m = MHub(k=1, seed=0)
    m.setup(bb, dm)
    for (n1, p1), (n2, p2) in zip(bb.qformer.named_parameters(), m.hub.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert torch.equal(m.query_tokens, bb.query_tokens)
    assert torch.equal(m.text_embeddings.word_embeddings.weight, bb.qformer_text_embeddings.word_embeddings.weight)


def test_loss_falls_when_training_the_hub(bb, dm):
    torch.manual_seed(0)
    m = MHub(k=1, seed=0, selection="similar")
    m.setup(bb, dm)
    train, _ = batches(dm)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    m.train()
    losses = []
    for _ in range(8):
        loss = m(bb, train)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the LM is frozen (and random here), so the hub can only move the prefix: a clear fall (the
    # demonstration's caption is drawn anew each step, so not a strictly monotone one)
    assert losses[-1] < losses[0] - 0.15 and max(losses[4:]) < losses[1], losses


def test_sequence_format_demos_eoc_query(bb, dm):
    """[demo_1 text features, EOC, demo_2 ..., EOC, query visual features, BOS, prompt], left-padded;
    the same assembly at training and generation for the same demonstrations."""
    m = MHub(k=2, seed=0, selection="similar")
    m.setup(bb, dm)
    _, test = batches(dm)
    m.eval()
    rows = m.select(test, bb.encode_images(test["image"]).mean(1))
    m.select = lambda batch, pooled=None: rows  # the same demonstrations in both modes
    with torch.no_grad():
        prefix, mask = m.build_prefix(bb, test)
        m.train()
        prefix_t, mask_t = m.build_prefix(bb, test)
    assert torch.allclose(prefix, prefix_t, atol=1e-6) and torch.equal(mask, mask_t)
    _, pm = bb.tokenize(test["prompt"])
    for i in range(3):
        _, dmask = bb.tokenize([m.demo_text(m._pool_rows[j]) for j in rows[i]], qformer=True)
        n_demo = int(dmask.sum())
        expect = n_demo + 2 + m.nq + 1 + int(pm[i].sum())
        assert int(mask[i].sum()) == expect
        row = prefix[i][mask[i].bool()]
        first_eoc = int(dmask[0].sum())
        assert torch.allclose(row[first_eoc], m.eoc) and torch.allclose(row[n_demo + 1], m.eoc)
        assert torch.allclose(row[n_demo + 2 + m.nq], bb.bos_embedding()[0])
    eid = bb.tokenizer.convert_tokens_to_ids(EOC_TOKEN)
    assert torch.allclose(m.eoc, bb.lm_embed(torch.tensor([eid]))[0])
    m.eval()
    preds = m(bb, test)["predictions"]
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)


def test_demonstration_selection(bb, dm):
    train, test = batches(dm)
    n_images = len({"|".join(r["paths"]) for r in dm.datasets["train"].rows})
    m = MHub(k=2, seed=0, selection="similar")
    m.setup(bb, dm)
    assert m.pool_pooled.shape[0] == n_images  # one pooled feature per training image, nothing else stored
    assert not [n for n, _ in m.named_buffers() if n.startswith("pool_feats")]
    q = bb.encode_images(test["image"]).mean(1)
    m.eval()
    sel = m.select(test, q)
    sims = torch.nn.functional.normalize(q, dim=-1) @ m.pool_pooled.T
    img = torch.tensor([[int(m.pool_image_of_row[j]) for j in row] for row in sel])
    picked = sims.gather(1, img)
    assert torch.allclose(picked.flip(1), sims.topk(2, dim=1).values)  # the two most similar images ...
    assert (picked[:, -1] >= picked[:, 0]).all()  # ... the most similar last, next to the query
    # a training query's own image is banned under `similar` too (it would be its own nearest neighbour)
    m.train()
    tq = bb.encode_images(train["image"]).mean(1)
    for i, row in enumerate(m.select(train, tq)):
        own = m.pool_image_ids[train["image_key"][i]]
        assert own not in [int(m.pool_image_of_row[j]) for j in row]
    r = MHub(k=2, seed=0)
    r.setup(bb, dm)
    assert not hasattr(r, "pool_pooled")  # random selection stores no features at all
    r.eval()
    assert r.select(test) == r.select(test)  # deterministic at test time
    r.train()
    seen = set()
    for _ in range(30):  # drawn from the whole training split, never the query's own image, k images
        for i, row in enumerate(r.select(train)):
            imgs = [int(r.pool_image_of_row[j]) for j in row]
            assert r.pool_image_ids[train["image_key"][i]] not in imgs and len(set(imgs)) == 2
            seen.update(row)
    assert len(seen) > len(dm.datasets["train"]) // 2


def test_lora_starts_at_identity_and_leaves_backbone_untouched(bb, dm):
    lo = LoRALM(k=0, seed=0)
    lo.setup(bb, dm)
    plain = VanillaICT(k=0, seed=0)
    plain.setup(bb, dm)
    train, _ = batches(dm)
    lo.train(), plain.train()
    lo.adapters.apply(lambda mod: setattr(mod, "dropout", torch.nn.Identity()) if hasattr(mod, "dropout") else None)
    assert lo(bb, train)["loss"].item() == pytest.approx(plain(bb, train)["loss"].item(), rel=1e-5)  # B = 0
    assert all(not mod._forward_hooks for mod in bb.language_model.modules())  # hooks removed after forward
    with torch.no_grad():
        for a in lo.adapters.values():
            a.lora_B.normal_()
    assert lo(bb, train)["loss"].item() != pytest.approx(plain(bb, train)["loss"].item(), rel=1e-3)
    keys = list(lo.peft_state_dict())
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    assert sum(p.numel() for p in lo.parameters()) == 2 * 2 * 8 * (64 + 64)  # 2 layers x (q, v) x r(A+B)


def test_bad_configuration_is_rejected(bb, dm):
    with pytest.raises(ValueError, match="FineTuneQFormer uses no demonstrations; method.k must be 0"):
        FineTuneQFormer(k=2)
    with pytest.raises(ValueError, match="selection must be 'random' or 'similar'"):
        MHub(selection="nearest")
    with pytest.raises(ValueError, match="demo_text must be 'target'"):
        MHub(demo_text="caption")
    with pytest.raises(ValueError, match="train_ln_vision must be false"):
        LoRALM(train_ln_vision=True)
    with pytest.raises(ValueError, match="k \\(demonstrations per query\\) must be >= 0"):
        MHub(k=-1)
    with pytest.raises(ValueError, match="LoRA rank"):
        LoRALM(r=0)
    with pytest.raises(TypeError, match="needs the 'blip2' backbone"):
        MHub().setup(torch.nn.Linear(2, 2), dm)
    with pytest.raises(RuntimeError, match="setup\\(backbone, datamodule\\) must run before forward"):
        MHub()(bb, {})
    with pytest.raises(ValueError, match="no nn.Linear named"):
        LoRALM(target_modules=["nope"]).setup(bb, dm)


CARDS = {"mmict_coco_caption": ("coco_captions", "captioning"), "mmict_vqav2": ("vqav2", "vqa"),
         "mmict_msvd": ("video_frames", "captioning"), "mmict_msrvtt": ("video_frames", "captioning")}


@pytest.mark.parametrize("card", sorted(CARDS))
def test_protocol_cards_compose_with_the_official_settings(card):
    from prompttune.config import compose

    cfg = compose(f"experiments/paper/{card}.yaml")
    assert (cfg.data.name, cfg.task.name) == CARDS[card]
    assert cfg.backbone.model == "Salesforce/blip2-flan-t5-xl" and cfg.method.name == "mhub"
    assert cfg.protocol.code == "KDEGroup/MMICT" and cfg.select == "last"
    m, o = cfg.method, cfg.method.optim
    assert (o.lr, o.weight_decay, o.epochs, o.warmup_steps, o.scheduler) == (1e-5, 0.05, 5, 1000, "cosine")
    assert m.num_beams == 5 and m.train_ln_vision and m.demo_padding
    assert (m.min_new_tokens, m.max_new_tokens) == ((1, 10) if card == "mmict_vqav2" else (8, 30))
    assert m.demo_text == ("prompt" if card == "mmict_vqav2" else "target")
    assert cfg.data.batch_size == 48 and cfg.data.augment
    if card != "mmict_vqav2":
        assert len(cfg.data.prompt) == 6 and cfg.data.text_processor == "blip_caption" and cfg.task.tokenizer == "ptb"
    # the text path never starts random silently: the card names a source (LAVIS checkpoint or BERT)
    assert cfg.backbone.qformer_text_from


def test_compose_time_checks(tmp_path):
    from prompttune.config import ConfigError, compose

    with pytest.raises(ConfigError, match="data='vqav2' holds vqa samples, but task='captioning' scores caption"):
        compose(None, ["method=mhub", "data=synth_vqa", "task=captioning"])
    with pytest.raises(ConfigError, match="data='coco_captions' holds caption samples, but task='vqa'"):
        compose(None, ["method=ft_qformer", "data=synth_caption", "task=vqa"])
    with pytest.raises(ConfigError, match="released HF BLIP-2 checkpoints drop them.*qformer_text_from.*"
                                          "bert-base-uncased.*qformer_text_random"):
        compose(None, ["method=mhub", "backbone=blip2_flan_t5_xl"])
    compose(None, ["method=vanilla_ict", "backbone=blip2_flan_t5_xl"])  # no Q-Former text: fine
    compose(None, ["method=mhub", "backbone=blip2_flan_t5_xl", "backbone.qformer_text_random=true"])
    with pytest.raises(ConfigError, match="method.demo_text='caption': expected one of target, prompt"):
        compose(None, ["method=mhub", "method.demo_text=caption"])
    with pytest.raises(ConfigError, match="unknown key 'method.demo_padding'"):  # not a vanilla_ict key
        compose(None, ["method=vanilla_ict", "method.demo_padding=true"])
    with pytest.raises(ConfigError, match="unknown key 'method.train_ln_vision'"):  # lora_lm trains adapters only
        compose(None, ["method=lora_lm", "method.train_ln_vision=true"])
    with pytest.raises(ConfigError, match="method.k=2: ft_qformer uses no demonstrations"):
        compose(None, ["method=ft_qformer", "method.k=2"])
    with pytest.raises(ConfigError, match="min_new_tokens=9 exceeds method.max_new_tokens=8"):
        compose(None, ["method=mhub", "method.min_new_tokens=9", "method.max_new_tokens=8"])


@pytest.mark.parametrize("sweep,n", [("ablation_mmict", 30), ("demo_mmict", 15)])
def test_shipped_sweeps_plan(sweep, n, tmp_path):
    from prompttune.sweep import plan

    _, runs = plan(f"experiments/{sweep}.yaml", runs_dir=tmp_path)
    assert len(runs) == n
    assert {r["cfg"].method.name for r in runs} >= {"ft_qformer", "vanilla_ict", "mhub"}
    assert all(r["cfg"].method.k == 0 for r in runs if r["cfg"].method.name == "ft_qformer")
    if sweep == "demo_mmict":  # the studio world, similar demonstrations (docs/mmict.md)
        assert all(r["cfg"].data.synthetic.collections == "studio" for r in runs)
        assert all(r["cfg"].method.selection == "similar" for r in runs if r["cfg"].method.name != "ft_qformer")
        # five seeds of the paper's 5 epochs for every method (mmict.yaml:55-68; docs/mmict.md, Results)
        assert sorted({r["cfg"].seed for r in runs}) == [0, 1, 2, 3, 4]
        assert {r["cfg"].method.optim.epochs for r in runs} == {5}


def test_demo_padding_feeds_every_text_position_up_to_the_batch_longest(bb, dm):
    """Official: one Q-Former tokenisation of the batch's texts (queries' instructions and the
    demonstrations' captions), padded to the longest; each demonstration contributes all of them."""
    _, test = batches(dm)
    m = MHub(k=2, seed=0, demo_padding=True, demo_text="target")
    m.setup(bb, dm)
    m.eval()
    rows = m.select(test)
    m.select = lambda batch, pooled=None: rows
    texts = [m._pool_rows[j]["target"] for row in rows for j in row]
    _, all_mask = bb.tokenize(list(test["prompt"]) + texts, qformer=True)
    longest = all_mask.shape[1]
    _, pm = bb.tokenize(test["prompt"])
    with torch.no_grad():
        prefix, mask = m.build_prefix(bb, test)
    for i in range(3):  # k demos x (longest + EOC) + queries + BOS + prompt
        assert int(mask[i].sum()) == 2 * (longest + 1) + m.nq + 1 + int(pm[i].sum())
    assert m.demo_text(m._pool_rows[rows[0][0]]) == m._pool_rows[rows[0][0]]["target"]  # the bare caption


def test_unk_rate_of_real_captions_is_warned_about(bb):
    """The five reference captions of COCO_val2014_000000391895 (as quoted in Karpathy's neuraltalk2
    prepro.py): 47 of their 88 tokens are <unk> to the zoo's word-level tokenizer."""
    coco = ["A man with a red helmet on a small moped on a dirt road. ",
            "Man riding a motor bike on a dirt road on the countryside.", "A man riding on the back of a motorcycle.",
            "A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a "
            "bridge and a background of cloud-wreathed mountains. ",
            "A man in a red shirt and a red hat is on a motorcycle on a hill side."]
    m = MHub(k=0)
    with pytest.warns(UserWarning, match=r"53% of the training targets' tokens are '<unk>'"):
        rate = m._check_unk_rate(bb, coco)
    assert rate == pytest.approx(47 / 88)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m._check_unk_rate(bb, ["a large red striped disc", "a blue square"]) == 0.0


def test_weight_decay_groups_as_lavis(bb, dm):
    m = MHub(k=0, train_ln_vision=True)
    m.setup(bb, dm)
    decay, no_decay = m.param_groups(None)
    names = {id(p): n for n, p in m.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert all(p.ndim >= 2 and "bias" not in names[id(p)] for p in decay["params"])
    assert {"ln_vision.weight", "ln_vision.bias"} <= {names[id(p)] for p in no_decay["params"]}
    assert id(m.query_tokens) in {id(p) for p in decay["params"]}  # 3-D: decayed, as in LAVIS
    assert len(decay["params"]) + len(no_decay["params"]) == len([p for p in m.parameters() if p.requires_grad])
