"""Bad input through the real command line, each in its own process: a clear message, a
non-zero exit, and nothing written (no result.json, no run directory where the check comes first)."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments/smoke.yaml"


def _world(tmp_path) -> Path:
    from prompttune.data.image_folder import ensure_synthetic

    root = tmp_path / "world"
    ensure_synthetic({"kind": "classification", "n_train": 2, "n_val": 0, "n_test": 1, "side": 16, "seed": 0}, root)
    return root


def _data_args(root: Path):
    # every training batch, so that every training image is read
    return [f"data.root={root}", "data.synthetic=null", "data.shots=0", "trainer.limit_train_batches=null"]


def test_malformed_yaml_names_line_and_column(cli, tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("method: coop\ndata: {shots: 4\n")
    out = cli("fit", bad, f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "malformed YAML in" in out.stderr and "line 3, column 1" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,msg", [
    (["method=coop", "method.n_ctx=lots"], "wrong type for 'method.n_ctx'"),
    (["trainer=tpu"], "unknown trainer 'tpu'"),
    (["method=coop", "data.on_corrupt=ignore"], "data.on_corrupt must be 'error' or 'skip'"),
])
def test_config_errors(cli, tmp_path, args, msg):
    out = cli("fit", SMOKE, *args, f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and msg in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "r" / "result.json").exists()


def test_empty_dataset_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = cli("fit", SMOKE, "method=coop", *_data_args(tmp_path / "empty"), f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "dataset folder is empty" in out.stderr
    assert not (tmp_path / "r").exists()


def test_split_file_naming_a_missing_image(cli, tmp_path):
    root = _world(tmp_path)
    first = json.loads((root / "split_prompttune_world.json").read_text())["test"][0][0]
    (root / "images" / first).unlink()
    out = cli("fit", SMOKE, "method=coop", *_data_args(root), f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "names 1 missing images" in out.stderr and first in out.stderr
    assert not (tmp_path / "r").exists()


def test_corrupt_image_fails_or_is_skipped_with_a_warning(cli, tmp_path):
    root = _world(tmp_path)
    split = json.loads((root / "split_prompttune_world.json").read_text())
    victim = root / "images" / split["train"][0][0]
    victim.write_bytes(victim.read_bytes()[:30])
    out = cli("fit", SMOKE, "method=linear_probe", *_data_args(root), f"run_dir={tmp_path / 'fail'}")
    assert out.returncode != 0 and "corrupt or truncated image" in out.stderr and victim.name in out.stderr
    assert not (tmp_path / "fail" / "result.json").exists()
    out = cli("fit", SMOKE, "method=linear_probe", *_data_args(root), "data.on_corrupt=skip",
              f"run_dir={tmp_path / 'skip'}")
    assert out.returncode == 0 and "skipping corrupt or truncated image" in out.stderr
    assert json.loads((tmp_path / "skip" / "result.json").read_text())["status"] == "completed"


def test_nonfinite_loss_stops_the_run_naming_the_step(cli, tmp_path):
    out = cli("fit", SMOKE, "method=linear_probe", "method.optim.name=sgd", "method.optim.lr=1e30",
              "method.optim.epochs=3", f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 3 and "non-finite training loss (nan) at epoch 1, step 2, batch 0" in out.stderr
    assert not (tmp_path / "r" / "result.json").exists()


def test_rerun_of_a_completed_run_keeps_its_record(cli, tmp_path):
    assert cli("fit", SMOKE, "method=zero_shot", f"run_dir={tmp_path / 'r'}").returncode == 0
    before = (tmp_path / "r" / "result.json").read_text()
    out = cli("fit", SMOKE, "method=zero_shot", f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 0 and "already completed" in out.stderr
    assert (tmp_path / "r" / "result.json").read_text() == before
