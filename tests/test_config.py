from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prompttune.config import ConfigError, compose, group_choices, load_yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments/smoke.yaml"


def test_defaults_follow_the_methods_uses():
    cfg = compose(None, ["method=coop"])
    assert cfg.choices.method == "coop" and cfg.choices.backbone == "zoo_clip" and cfg.choices.data == "synth_fine"
    assert cfg.method.n_ctx == 16 and cfg.method.optim.name == "sgd"
    assert cfg.trainer.precision == "32-true"


def test_group_swap_and_dotted_tuning_on_the_command_line():
    cfg = compose(None, ["method=coop", "method.n_ctx=4", "method.optim.lr=0.01", "data.shots=4", "seed=3"])
    assert cfg.method.n_ctx == 4 and cfg.method.optim.lr == 0.01 and cfg.data.shots == 4 and cfg.seed == 3


def test_experiment_tuning_survives_a_later_method_choice():
    # smoke.yaml tunes whatever method is chosen (epochs 1); the CLI chooses coop after it
    cfg = compose(SMOKE, ["method=coop"])
    assert cfg.method.optim.epochs == 1 and cfg.backbone.weights == "random"


def test_choice_bound_tuning_is_dropped_when_the_group_is_chosen_again(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("defaults: {method: coop}\nmethod: {n_ctx: 4}\n")
    assert compose(exp).method.n_ctx == 4
    cfg = compose(exp, ["method=linear_probe"])  # n_ctx does not exist for linear_probe: dropped, not an error
    assert "n_ctx" not in cfg.method


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'method.n_ctxx'.*did you mean 'n_ctx'.*valid keys"):
        compose(None, ["method=coop", "method.n_ctxx=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'sed'.*valid keys here"):
        compose(None, ["sed=1"])


def test_unknown_group_name_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown method 'coopp' \(did you mean 'coop'\?\); valid choices: .*zero_shot"):
        compose(None, ["method=coopp"])
    with pytest.raises(ConfigError, match="unknown trainer 'tpu'"):
        compose(None, ["trainer=tpu"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match=r"wrong type for 'method.n_ctx': got 'many' \(str\), expected int"):
        compose(None, ["method=coop", "method.n_ctx=many"])
    with pytest.raises(ConfigError, match="wrong type for 'data.shots'"):
        compose(None, ["method=coop", "data.shots=1.5"])
    assert compose(None, ["method=coop", "method.optim.lr=1"]).method.optim.lr == 1.0  # int -> float is fine


def test_malformed_yaml_says_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: coop\ndata: {shots: 4\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line \d+, column \d+"):
        compose(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        compose(tmp_path / "missing.yaml")


def test_bad_dotlist_item():
    with pytest.raises(ConfigError, match="must look like key=value"):
        compose(None, ["method"])


def test_every_shipped_config_composes():
    for method in group_choices("method"):
        cfg = compose(None, [f"method={method}"])
        assert cfg.method.name and cfg.choices.method == method
    for group in ("backbone", "data", "trainer", "task"):
        for name in group_choices(group):
            assert load_yaml(REPO / "configs" / group / f"{name}.yaml") is not None


def test_every_experiment_file_composes():
    from prompttune.sweep import plan

    for exp in sorted((REPO / "experiments").glob("*.yaml")):
        if "transfer" in load_yaml(exp):  # a TVP transfer spec, validated in tests/test_transfer.py
            continue
        if "sweep" in load_yaml(exp):
            block, runs = plan(exp)
            assert runs, exp
        else:
            compose(exp, [] if load_yaml(exp).get("method") or load_yaml(exp).get("defaults") else ["method=coop"])


def test_resolved_config_is_plain_yaml(tmp_path):
    from prompttune.config import save

    cfg = compose(SMOKE, ["method=coop"])
    save(cfg, tmp_path / "c.yaml")
    back = OmegaConf.load(tmp_path / "c.yaml")
    assert back.method.n_ctx == cfg.method.n_ctx and "${" not in (tmp_path / "c.yaml").read_text()


def test_scientific_notation_is_a_float_on_the_command_line_and_in_files(tmp_path):
    from prompttune.config import parse_dotlist

    assert parse_dotlist(["a=1e-3", "b=2E5", "c=3", "d=x1e3"]) == {"a": 0.001, "b": 200000.0, "c": 3, "d": "x1e3"}
    exp = tmp_path / "e.yaml"
    exp.write_text("method: {optim: {lr: 5e-4}}\n")
    assert compose(exp, ["method=coop"]).method.optim.lr == 0.0005
