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
    # the LM is frozen (and random here), so the hub can only move the prefix: a steady, clear fall
    assert losses[-1] < losses[0] - 0.15 and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_sequence_format_demos_eoc_query(bb, dm):
    """[demo_1 text features, EOC, demo_2 ..., EOC, query visual features, BOS, prompt], left-padded;
    the same assembly at training and generation (selection 'similar' is deterministic)."""
    m = MHub(k=2, seed=0, selection="similar")
    m.setup(bb, dm)
    _, test = batches(dm)
    m.eval()
    with torch.no_grad():
        prefix, mask = m.build_prefix(bb, test)
        m.train()
        prefix_t, mask_t = m.build_prefix(bb, test)
    assert torch.allclose(prefix, prefix_t, atol=1e-6) and torch.equal(mask, mask_t)
    idx = m.select(test, bb.encode_images(test["image"]).mean(1))
    _, pm = bb.tokenize(test["prompt"])
    for i in range(3):
        _, dmask = bb.tokenize([m.pool_text[j] for j in idx[i].tolist()], qformer=True)
        n_demo = int(dmask.sum())
        expect = n_demo + 2 + m.nq + 1 + int(pm[i].sum())
        assert int(mask[i].sum()) == expect
        row = prefix[i][mask[i].bool()]
        eoc = m.eoc
        first_eoc = int(dmask[0].sum())
        assert torch.allclose(row[first_eoc], eoc) and torch.allclose(row[n_demo + 1], eoc)
        assert torch.allclose(row[n_demo + 2 + m.nq], bb.bos_embedding()[0])
    eid = bb.tokenizer.convert_tokens_to_ids(EOC_TOKEN)
    assert torch.allclose(m.eoc, bb.lm_embed(torch.tensor([eid]))[0])
    m.eval()
    preds = m(bb, test)["predictions"]
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)


def test_demonstration_selection(bb, dm):
    train, test = batches(dm)
    m = MHub(k=2, seed=0, selection="similar")
    m.setup(bb, dm)
    q = bb.encode_images(test["image"]).mean(1)
    sel = m.select(test, q)
    sims = torch.nn.functional.normalize(q, dim=-1) @ m.pool_pooled.T
    picked = sims.gather(1, sel)  # (ties: five captions share each image)
    assert torch.allclose(picked.flip(1), sims.topk(2, dim=1).values)  # the two most similar ...
    assert (picked[:, -1] >= picked[:, 0]).all()  # ... the most similar last, next to the query
    r = MHub(k=2, seed=0)
    r.setup(bb, dm)
    r.eval()
    assert torch.equal(r.select(test, q), r.select(test, q))  # deterministic at test time
    r.train()
    for _ in range(5):  # a training query never sees its own image as a demonstration
        s = r.select(train, bb.encode_images(train["image"]).mean(1))
        for i, row in enumerate(s.tolist()):
            own = r.pool_image_key[r.pool_of_index[int(train["index"][i])]]
            assert all(r.pool_image_key[j] != own for j in row)


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


@pytest.mark.parametrize("path", ["mmict_caption", "mmict_vqa", "mmict_video"])
@pytest.mark.parametrize("data", [None, "coco_karpathy", "vqav2_coco", "msvd_frames"])
def test_shipped_experiments_and_configs_compose(path, data, tmp_path):
    from prompttune.config import compose

    cfg = compose(f"experiments/{path}.yaml", [f"data={data}"] if data else [])
    assert cfg.backbone.name == "blip2" and cfg.method.name == "mhub"
    assert cfg.task.name == {"mmict_vqa": "vqa"}.get(path, "captioning")
    for backbone in ("blip2_opt_2.7b", "blip2_flan_t5_xl"):
        assert compose(f"experiments/{path}.yaml", [f"backbone={backbone}"]).backbone.model.startswith("Salesforce/")


@pytest.mark.parametrize("sweep,n", [("ablation_mmict", 30), ("demo_mmict", 3)])
def test_shipped_sweeps_plan(sweep, n, tmp_path):
    from prompttune.sweep import plan

    _, runs = plan(f"experiments/{sweep}.yaml", runs_dir=tmp_path)
    assert len(runs) == n
    assert {r["cfg"].method.name for r in runs} >= {"ft_qformer", "vanilla_ict", "mhub"}
    assert all(r["cfg"].method.k == 0 for r in runs if r["cfg"].method.name == "ft_qformer")
