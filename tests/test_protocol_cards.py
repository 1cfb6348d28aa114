"""Every protocol card (experiments/paper/*.yaml) states its paper, code, headline metric and
reporting protocol, composes to a valid run config, and is listed by `prompttune list`."""

from pathlib import Path

import pytest

from prompttune.config import compose, load_yaml

REPO = Path(__file__).resolve().parents[1]
CARDS = sorted((REPO / "experiments" / "paper").glob("*.yaml"))


def test_there_are_cards_for_every_paper():
    stems = " ".join(p.stem for p in CARDS)
    for prefix in ("inmemo_", "e_inmemo_", "dcar_", "mmict_", "spt_", "tvp_", "coop_", "vpt_"):
        assert prefix in stems, f"no protocol card for {prefix}*"


@pytest.mark.parametrize("card", CARDS, ids=[p.stem for p in CARDS])
def test_card_states_its_protocol_and_composes(card):
    raw = load_yaml(card)
    proto = raw.get("protocol")
    assert isinstance(proto, dict), f"{card.name}: no protocol: block"
    for key in ("paper", "code", "headline"):
        assert proto.get(key), f"{card.name}: protocol.{key} is missing"
    head = proto["headline"]
    assert str(head.get("metric", "")).startswith("test/"), f"{card.name}: headline.metric must be a test metric"
    assert head.get("source"), f"{card.name}: headline.source must say where the number (or its absence) comes from"
    if head.get("value") is not None:
        assert head.get("tolerance") is not None, f"{card.name}: a headline value needs a tolerance"
    text = card.read_text()
    assert "#" in text.split("protocol:", 1)[1], f"{card.name}: hyper-parameters must cite their sources in comments"
    if "sweep" in raw or "transfer" in raw:
        return  # a sweep or transfer spec: its points are composed by its own loader's tests
    cfg = compose(card)
    assert cfg.select in ("last", "val", "test")
    assert cfg.protocol.headline.metric == head["metric"]


def test_list_shows_every_card(capsys):
    from prompttune.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for card in CARDS:
        assert card.stem in out
