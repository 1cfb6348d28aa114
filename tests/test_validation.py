"""Compose-time validation (issue 17): every bad value is refused before any model or data is
built, naming the key, the value and what was expected. In-process here (fast); the exit code
and "nothing written" are checked through the real CLI in tests/test_bad_input_cli.py."""

from pathlib import Path

import pytest

from prompttune.config import ConfigError, compose

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments/smoke.yaml"


@pytest.mark.parametrize("override,expected", [
    # from the issue
    ("data.shots=-1", "data.shots=-1: expected a whole number >= 0"),
    ("data.batch_size=0", "data.batch_size=0: expected a whole number >= 1"),
    ("method.optim.lr=-0.01", "method.optim.lr=-0.01: expected a number > 0"),
    ("method.optim.epochs=-3", "method.optim.epochs=-3: expected a whole number >= 0"),
    ("method.optim.name=sgdd", "method.optim.name='sgdd': expected one of sgd, adam, adamw (did you mean 'sgd'?)"),
    ("method.optim.scheduler=cosin", "method.optim.scheduler='cosin': unknown scheduler 'cosin'"),
    ("trainer.precision=bf17", "trainer.precision='bf17': expected one of auto,"),
    # our own: realistic slips
    ("method.optim.epochs=0", "method.optim.epochs=0: method 'coop' trains, so expected a whole number >= 1"),
    ("method.optim.lr=0", "method.optim.lr=0.0: expected a number > 0"),
    ("method.optim.lr=.nan", "method.optim.lr=nan: expected a number, not NaN"),
    ("method.optim.lr=.inf", "method.optim.lr=inf: expected a number > 0"),
    ("method.optim.momentum=1.5", "method.optim.momentum=1.5: expected a number >= 0 and <= 1"),
    ("method.optim.weight_decay=-0.1", "method.optim.weight_decay=-0.1: expected a number >= 0"),
    ("method.optim.warmup_epochs=-1", "method.optim.warmup_epochs=-1"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0: expected a whole number >= 1"),
    ("data.num_workers=-2", "data.num_workers=-2: expected a whole number >= 0"),
    ("data.on_corrupt=ignore", "data.on_corrupt='ignore': expected one of error, skip"),
    ("seed=-1", "seed=-1: expected a whole number >= 0"),
    ("trainer.devices=0", "trainer.devices=0: expected a device count >= 1"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0: expected a whole number >= 1"),
    ("trainer.cpu_threads=0", "trainer.cpu_threads=0: expected a whole number >= 1 (or null)"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches=1.5: expected a fraction in [0, 1]"),
    ("trainer.limit_test_batches=-1", "trainer.limit_test_batches=-1"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: expected a whole number >= 1"),
    ("wandb.mode=onlin", "wandb.mode='onlin': expected one of auto, online, offline, disabled (did you mean 'online'?)"),
    ("select=best", "select='best': expected one of last, val, test"),
    ("select_mode=maximum", "select_mode='maximum': expected max or min"),
    ("select_metric=val/acc", "select_metric='val/acc' has no effect with select='last'"),
])
def test_bad_values_are_refused_at_compose_time(override, expected):
    with pytest.raises(ConfigError) as err:
        compose(SMOKE, ["method=coop", override])
    assert expected in str(err.value), str(err.value)


@pytest.mark.parametrize("override", ["method.optim.name=SGD", "trainer.precision=bf16-mixed", "data.shots=0",
                                      "trainer.devices=auto", "trainer.limit_train_batches=0.5",
                                      "trainer.limit_train_batches=3", "method.optim.scheduler=constant"])
def test_good_values_pass(override):
    compose(SMOKE, ["method=coop", override])


def test_training_free_baselines_keep_zero_epochs():
    for m in ("zero_shot", "zero_shot_retrieval", "no_prompt"):
        assert compose(REPO / "experiments/base.yaml", [f"method={m}"]).method.optim.epochs == 0


def test_every_method_composes_with_its_defaults():
    """The rules must not refuse a shipped config: every method, over both base experiments."""
    from prompttune.config import group_choices

    for m in group_choices("method"):
        for exp in ("smoke", "base"):
            compose(REPO / f"experiments/{exp}.yaml", [f"method={m}"])


def test_method_hook_runs_at_compose_time(monkeypatch):
    from prompttune.registry import METHODS

    seen = []
    cls = METHODS.get("coop")
    monkeypatch.setattr(cls, "check_config", classmethod(lambda c, cfg: seen.append(cfg.method.name)))
    compose(SMOKE, ["method=coop"])
    assert seen == ["coop"]


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("method: coop\nseed: 1\nmethod: zero_shot\n")
    with pytest.raises(ConfigError) as err:
        compose(f)
    assert f"duplicate key 'method' in {f}: first at line 1, again at line 3" in str(err.value)


def test_nested_duplicate_yaml_key(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("method: coop\ndata:\n  shots: 1\n  batch_size: 4\n  shots: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'shots'.*line 3, again at line 5"):
        compose(f)


def test_non_utf8_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_bytes("method: coop\n# caf\xe9 in latin-1\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        compose(f)
    assert f"{f} is not UTF-8 text (byte 0xe9 at line 2)" in str(err.value)


def test_experiment_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; name a YAML file in it"):
        compose(tmp_path)


def test_dataset_root_that_is_a_file(tmp_path):
    from prompttune.data.base import DataError, check_folder

    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file, not a folder"):
        check_folder(f, "image-folder dataset", "a CoOp folder")


@pytest.mark.parametrize("seeds,msg", [("[]", "expected a non-empty list"), ("[-1]", "expected a non-empty list"),
                                       ("[0, 0]", "repeats a seed"), ("[a]", "expected a non-empty list")])
def test_sweep_seeds_are_checked(tmp_path, seeds, msg):
    from prompttune.sweep import load_sweep

    f = tmp_path / "sweep.yaml"
    f.write_text(f"method: coop\nsweep:\n  grid: {{data.shots: [1]}}\n  seeds: {seeds}\n")
    with pytest.raises(ConfigError, match=msg):
        load_sweep(f)


def test_overrides_may_follow_options():
    from prompttune.cli import parse_args

    assert parse_args(["sweep", "X.yaml", "--jobs", "2", "seed=1", "data.shots=4"]).overrides == ["seed=1", "data.shots=4"]
    assert parse_args(["fit", "X.yaml", "a=1", "--force", "b=2"]).overrides == ["a=1", "b=2"]
    with pytest.raises(SystemExit):
        parse_args(["fit", "X.yaml", "--force", "--bogus"])


def test_report_on_a_folder_without_runs_is_an_error(tmp_path):
    from prompttune.report import make_report

    with pytest.raises(ConfigError, match="no runs under"):
        make_report(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        make_report(tmp_path / "nope")
    assert make_report(tmp_path, allow_empty=True)["markdown"]  # a sweep whose runs all failed still reports
