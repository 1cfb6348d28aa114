"""The ViT protocol cards (experiments/paper/{spt,vpt}_*.yaml): they compose, every hyper-parameter line
cites its source, and the official constants are pinned (issue 13, items 6, 7, 10, 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prompttune.config import ConfigError, compose, validate
from prompttune.methods.spt import SPT
from prompttune.methods.vpt import VPT

REPO = Path(__file__).resolve().parents[1]
CARDS = ["spt_mae_cub", "spt_mae_cub_shallow", "spt_moco_dogs", "spt_mae_vtab", "vpt_cub"]


def card(name):
    return compose(REPO / "experiments" / "paper" / f"{name}.yaml")


@pytest.mark.parametrize("name", CARDS)
def test_card_composes_validates_and_cites_every_value(name):
    cfg = card(name)
    validate(cfg)  # includes the method's check_config
    assert cfg.select in ("test", "val")
    p = cfg.protocol
    assert p.paper and p.code and p.headline.metric == "test/acc" and p.headline.source
    # every hyper-parameter line of the card carries a source comment
    text = (REPO / "experiments" / "paper" / f"{name}.yaml").read_text().splitlines()
    body = [ln for ln in text if re.match(r"^\s+\w+: ", ln) and not re.match(r"^\s+(paper|code|headline|notes|optim):", ln)]
    body += [ln for ln in text if re.match(r"^\s+optim: \{", ln)]
    assert body and all("#" in ln for ln in body), [ln for ln in body if "#" not in ln]
    assert "#" in next(ln for ln in text if ln.startswith("select:"))


def test_spt_recipes_are_the_readme_recipes():
    mae = card("spt_mae_cub")  # SPT README.md:68-87
    o = mae.method.optim
    assert (o.name, o.lr, o.weight_decay, o.epochs, o.warmup_epochs, o.min_lr) == ("adamw", 0.05, 0.01, 100, 10, 1e-8)
    assert (mae.method.head_weight_decay, mae.method.num_prompts, mae.method.head_init_std) == (0.5, 20, 0.02)
    assert mae.data.batch_size == 32 and mae.backbone.drop_path_rate == 0.0 and mae.select == "test"
    assert mae.protocol.headline.value == 80.26 and mae.protocol.headline.tolerance == 1.0
    moco = card("spt_moco_dogs")  # README.md:98-119, train_MoCo.py
    o = moco.method.optim
    assert (o.lr, o.weight_decay, moco.method.head_weight_decay) == (0.001, 0.01, 3.0)
    assert moco.method.head_init_std == 0.01  # train_MoCo.py:260
    assert moco.method.init_images == 1       # train_MoCo.py:100 sample_size=1
    assert card("spt_mae_cub_shallow").method.num_prompts == 100 and not card("spt_mae_cub_shallow").method.deep


def test_vpt_card_is_vpts_protocol():
    c = card("vpt_cub")
    assert c.method.optim.lr == pytest.approx(0.25 * c.data.batch_size / 256)  # tune_fgvc.py:31
    assert c.data.batch_size == 128 and c.method.optim.name == "sgd" and c.method.optim.momentum == 0.9
    assert (c.data.train_crop, c.data.interpolation, c.data.layout) == ("resize_random", "bilinear", "vpt_json")
    assert c.data.resize_ratio == pytest.approx(256 / 224) and c.select == "val" and c.method.deep


def test_cards_are_listed_where_users_look():
    doc = (REPO / "docs" / "visual_prompt_tuning.md").read_text()
    for name in CARDS:
        assert f"experiments/paper/{name}.yaml" in doc


@pytest.mark.parametrize("cls,bad,match", [
    (VPT, {"num_prompts": 0}, r"method.num_prompts=0: expected a whole number >= 1"),
    (VPT, {"prompt_dropout": 1.0}, r"method.prompt_dropout=1.0: expected a number >= 0 and < 1"),
    (VPT, {"head_init_std": 0.0}, r"method.head_init_std=0.0: expected a number > 0"),
    (SPT, {"init_type": "medoids"}, r"method.init_type='medoids': expected one of random, mean_pooling"),
    (SPT, {"init_images": 0}, r"method.init_images=0: expected a whole number >= 1"),
    (SPT, {"init_type": "kmeans", "kmeans_samples": 4, "num_prompts": 8}, r"method.kmeans_samples=4: k-means needs"),
])
def test_method_check_config(cls, bad, match):
    base = {"num_prompts": 8, "deep": True, "prompt_dropout": 0.0, "head_init_std": 0.02, "init_type": "random",
            "init_images": 16, "kmeans_samples": 64}
    with pytest.raises(ConfigError, match=match):
        cls.check_config(OmegaConf.create({"method": {**base, **bad}}))
    cls.check_config(OmegaConf.create({"method": base}))


def test_head_init_std_is_used():
    import torch

    from prompttune.methods._vit_prompts import ClassifierHead

    torch.manual_seed(0)
    assert ClassifierHead(256, 512, std=0.01).weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert ClassifierHead(256, 512).weight.std().item() == pytest.approx(0.02, rel=0.05)
