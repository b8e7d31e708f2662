"""`catdog predict` on files, folders and globs; table, JSON lines and CSV; failures mixed with good files."""

from __future__ import annotations

import csv
import json

from tests.conftest import make_bad_inputs
from tests.test_cli import run


def test_json_lines_for_a_folder_and_a_glob(synthetic_data, tiny_checkpoint):
    out = run(
        "predict",
        synthetic_data / "val" / "cat",
        str(synthetic_data / "val" / "dog" / "dog_000[01].jpg"),
        "--checkpoint",
        tiny_checkpoint,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert set(row) == {"file", "label", "probabilities"}
        assert row["label"] in ("cat", "dog") and set(row["probabilities"]) == {"cat", "dog"}


def test_table_top_k_and_csv(synthetic_data, tiny_checkpoint, tmp_path):
    target = tmp_path / "out.csv"
    out = run("predict", synthetic_data / "val", "--checkpoint", tiny_checkpoint, "--csv", target, "--top-k", "1")
    assert out.returncode == 0, out.stderr
    assert "top 1" in out.stdout and "cat_0000.jpg" in out.stdout
    with target.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and set(rows[0]) == {"file", "label", "cat", "dog", "error"}
    assert all(abs(float(r["cat"]) + float(r["dog"]) - 1) < 1e-4 for r in rows)


def test_failures_are_reported_and_the_rest_still_predicted(tiny_checkpoint, tmp_path):
    cases = make_bad_inputs(tmp_path / "in")
    out = run(
        "predict",
        *(p for p, _ in cases.values()),
        tmp_path / "missing.jpg",
        "--checkpoint",
        tiny_checkpoint,
        "--json",
        "--max-pixels",
        "50000000",
        "--batch-size",
        "4",
    )
    assert out.returncode == 1  # some files failed
    rows = {r["file"]: r for r in map(json.loads, out.stdout.splitlines())}
    for name, (path, expected_error) in cases.items():
        row = rows[str(path)]
        if expected_error is None:
            assert row["label"] in ("cat", "dog"), (name, row)
        else:
            assert expected_error in row["error"], (name, row)
    assert "file not found" in rows[str(tmp_path / "missing.jpg")]["error"]
    table = run("predict", *(p for p, _ in cases.values()), "--checkpoint", tiny_checkpoint)
    assert table.returncode == 1 and "failed:" in table.stderr and "Traceback" not in table.stderr
    assert "rgba.png" in table.stdout


def test_default_checkpoint_is_the_best_under_checkpoint(synthetic_data, tiny_checkpoint, tmp_path):
    (tmp_path / "checkpoint" / "run").mkdir(parents=True)
    (tmp_path / "checkpoint" / "run" / "best.pt").write_bytes(tiny_checkpoint.read_bytes())
    out = run("predict", synthetic_data / "val" / "cat" / "cat_0000.jpg", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "checkpoint/run/best.pt" in out.stdout.replace("\n", "")
    nothing = run("predict", synthetic_data / "val", cwd=tmp_path / "checkpoint" / "run")
    assert nothing.returncode == 1 and "no checkpoint found" in nothing.stderr


def test_precision_values_that_do_not_fit_are_one_line_errors(synthetic_data, tiny_checkpoint):
    image = synthetic_data / "val" / "cat" / "cat_0000.jpg"
    for precision, message in (("fp16", "needs a GPU"), ("int8", "calibration images"), ("fp8", "must be one of")):
        out = run("predict", image, "--checkpoint", tiny_checkpoint, "--precision", precision, "--device", "cpu")
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
