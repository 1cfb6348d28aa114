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
    (["method=coop", "data.on_corrupt=ignore"], "data.on_corrupt='ignore': expected one of error, skip"),
    # issue 17: each used to fail with a traceback after the model and data were built
    (["method=coop", "data.shots=-1"], "data.shots=-1: expected a whole number >= 0"),
    (["method=coop", "data.batch_size=0"], "data.batch_size=0: expected a whole number >= 1"),
    (["method=coop", "method.optim.lr=-0.01"], "method.optim.lr=-0.01: expected a number > 0"),
    (["method=coop", "method.optim.epochs=-3"], "method.optim.epochs=-3: expected a whole number >= 0"),
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
    assert json.loads((tmp_path / "fail" / "result.json").read_text())["status"] == "failed"  # never "completed"
    out = cli("fit", SMOKE, "method=linear_probe", *_data_args(root), "data.on_corrupt=skip",
              f"run_dir={tmp_path / 'skip'}")
    assert out.returncode == 0 and "skipping corrupt or truncated image" in out.stderr
    assert json.loads((tmp_path / "skip" / "result.json").read_text())["status"] == "completed"


def test_nonfinite_loss_stops_the_run_naming_the_step(cli, tmp_path):
    out = cli("fit", SMOKE, "method=linear_probe", "method.optim.name=sgd", "method.optim.lr=1e30",
              "method.optim.epochs=3", f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 3 and "non-finite training loss (nan) at epoch 1, step 2, batch 0" in out.stderr
    rec = json.loads((tmp_path / "r" / "result.json").read_text())
    assert rec["status"] == "failed" and "non-finite training loss" in rec["error"]


def test_rerun_of_a_completed_run_keeps_its_record(cli, tmp_path):
    assert cli("fit", SMOKE, "method=zero_shot", f"run_dir={tmp_path / 'r'}").returncode == 0
    before = (tmp_path / "r" / "result.json").read_text()
    out = cli("fit", SMOKE, "method=zero_shot", f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 0 and "already completed" in out.stderr
    assert (tmp_path / "r" / "result.json").read_text() == before


@pytest.mark.parametrize("typo,fix", [
    ("method.optim.name=sgdd", "method.optim.name=sgd"),
    ("method.optim.scheduler=cosin", "method.optim.scheduler=cosine"),
    ("trainer.precision=bf17", "trainer.precision=32-true"),
])
def test_enum_typo_exits_2_writes_nothing_and_the_fixed_rerun_runs(cli, tmp_path, typo, fix):
    rdir = tmp_path / "r"
    out = cli("fit", SMOKE, "method=linear_probe", typo, f"run_dir={rdir}")
    key, value = typo.split("=")
    assert out.returncode == 2 and f"{key}={value!r}: " in out.stderr and "Traceback" not in out.stderr
    assert not rdir.exists()  # refused before anything was written: nothing can block the fixed rerun
    out = cli("fit", SMOKE, "method=linear_probe", fix, f"run_dir={rdir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((rdir / "result.json").read_text())["status"] == "completed"


def test_non_utf8_and_duplicate_key_files_exit_2(cli, tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("method: coop\n# caf\xe9\n".encode("latin-1"))
    out = cli("fit", latin, f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and f"{latin} is not UTF-8 text" in out.stderr and "Traceback" not in out.stderr
    dup = tmp_path / "dup.yaml"
    dup.write_text("method: coop\nmethod: zero_shot\n")
    out = cli("fit", dup, f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "duplicate key 'method'" in out.stderr and "line 1, again at line 2" in out.stderr
    assert not (tmp_path / "r").exists()


def test_dataset_root_that_is_a_file_exits_2(cli, tmp_path):
    f = tmp_path / "pets.tar"
    f.write_bytes(b"not a folder")
    out = cli("fit", SMOKE, "method=coop", f"data.root={f}", "data.synthetic=null", f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and f"{f} is a file, not a folder" in out.stderr
    assert not (tmp_path / "r" / "result.json").exists()


def test_shots_beyond_the_smallest_class_warn_and_record_the_counts_used(cli, tmp_path):
    root = _world(tmp_path)  # 2 training images per class
    out = cli("fit", SMOKE, "method=linear_probe", f"data.root={root}", "data.synthetic=null", "data.shots=100",
              f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data.shots=100, but 16 of 16 classes have fewer training images (smallest: 2)" in out.stderr
    rec = json.loads((tmp_path / "r" / "result.json").read_text())
    assert rec["data_record"]["shots_used"] == {"requested": 100, "min_per_class": 2, "max_per_class": 2,
                                                "classes_short": 16}


def test_one_class_dataset_exits_2_before_compute(cli, tmp_path):
    root = _world(tmp_path)
    split_file = root / "split_prompttune_world.json"
    split = json.loads(split_file.read_text())
    one = {s: [r for r in rows if r[1] == 0] for s, rows in split.items()}
    split_file.write_text(json.dumps(one))
    out = cli("fit", SMOKE, "method=coop", *_data_args(root), f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "has 1 class" in out.stderr and "needs at least 2 classes" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "r").exists()
