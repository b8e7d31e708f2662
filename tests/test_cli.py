"""The real `catdog` command: help, one-line errors, data check/synth, train + eval --json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from catdog_glm.vision.checkpoint import load_checkpoint
from tests.conftest import catdog_env, save_image

CATDOG = [sys.executable, "-m", "catdog_glm"]
SUBCOMMANDS = ["train", "eval", "predict", "serve-classifier", "serve-chat", "chat", "data", "export", "pull", "models"]


def run(*args, cwd=None, timeout=300):
    return subprocess.run(
        [*CATDOG, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=catdog_env(), timeout=timeout
    )


def test_help_lists_every_subcommand_and_is_fast():
    started = time.perf_counter()
    out = run("--help")
    elapsed = time.perf_counter() - started
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout
    assert "torch" not in sys.modules or elapsed < 5  # no heavy import on --help
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, catdog_glm.cli; "
            "print(any(m in sys.modules for m in ('torch', 'gradio', 'transformers', 'swanlab')))",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize(
    "command",
    [
        "train",
        "eval",
        "predict",
        "serve-classifier",
        "chat",
        "serve-chat",
        "data check",
        "data synth",
        "data pull",
        "data list",
        "export chat",
        "export classifier",
    ],
)
def test_every_option_has_help_text(command):
    out = run(*command.split(), "--help")
    assert out.returncode == 0
    lines = [ln for ln in out.stdout.splitlines() if re.match(r"│\s*(\*\s+)?--", ln.strip())]
    assert lines and all(len(ln.split()) > 3 for ln in lines), lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/no/such/folder"], "does not exist"),
        (["train", "--data", ".", "--precision", "int8"], "--precision int8 does not apply to training"),
        (["train", "--data", ".", "--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16, got"),
        (["chat", "--precision", "int8"], "--precision int8 does not apply to chat models (int8/int4 weights: --quan"),
        (["export", "chat", "--model", ".", "--out", "x", "--precision", "int8"], "does not apply to an export"),
        (["train", "--data", ".", "--epochs", "0"], "--epochs must be at least 1"),
        (["eval", "--checkpoint", "/no/such.pt", "--data", "."], "does not exist"),
        # square brackets in a value are printed as written, not eaten as rich markup
        (["train", "--data", "/no/[such]/folder"], "/no/[such]/folder"),
        (["train", "--data", ".", "--device", "tpu"], "unknown device"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("Error:") and len(out.stderr.strip().splitlines()) <= 3


def test_old_option_spellings_still_work_with_a_one_line_warning(capsys):
    from catdog_glm.cli._common import legacy_precision
    from catdog_glm.errors import ConfigError

    assert legacy_precision("auto") == "auto" and capsys.readouterr().err == ""
    assert legacy_precision("auto", amp=False) == "fp32"
    assert legacy_precision("auto", dtype="bf16") == "bf16"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [
        "Warning: --no-amp is deprecated and will be removed in the next release; use --precision fp32.",
        "Warning: --dtype bf16 is deprecated and will be removed in the next release; use --precision bf16.",
    ]
    with pytest.raises(ConfigError, match="--no-amp and --precision bf16 disagree"):
        legacy_precision("bf16", amp=False)


def test_single_class_dataset_is_refused_before_work(tmp_path):
    for i in range(3):
        save_image(tmp_path / "cat" / f"{i}.jpg")
    out = run("train", "--data", tmp_path, "--output", tmp_path / "out", "--pretrained", "none")
    assert out.returncode == 1 and "single class" in out.stderr
    assert not (tmp_path / "out").exists()


def test_data_check_reports_counts_sizes_and_bad_files(synthetic_data, tmp_path):
    good = run("data", "check", synthetic_data)
    assert good.returncode == 0, good.stderr
    assert "all 32 images decode" in good.stdout and "median" in good.stdout
    bad_root = tmp_path / "d"
    for c in ("cat", "dog"):
        for i in range(3):
            save_image(bad_root / c / f"{i}.png", size=(40 + i, 30))
    (bad_root / "dog" / "zero.jpg").write_bytes(b"")
    (bad_root / "cat" / "junk.jpg").write_bytes(b"junk")
    bad = run("data", "check", bad_root)
    assert bad.returncode == 1
    assert "2 unreadable file(s)" in bad.stdout
    assert "zero.jpg" in bad.stdout and "junk.jpg" in bad.stdout


def test_train_then_eval_json_and_plot(synthetic_data, tmp_path):
    out_dir = tmp_path / "run"
    trained = run(
        "train",
        "--data",
        synthetic_data,
        "--epochs",
        "1",
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--pretrained",
        "none",
        "--output",
        out_dir,
        "--tracker",
        "none",
        "--workers",
        "0",
    )
    assert trained.returncode == 0, trained.stderr
    assert "Training summary" in trained.stdout and "test_acc" in trained.stdout
    evaluated = run(
        "eval", "--checkpoint", out_dir / "best.pt", "--data", synthetic_data, "--json", "--plot", tmp_path / "cm.png"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert {"accuracy", "loss", "n", "per_class", "confusion_matrix", "classes", "split", "scored"} <= report.keys()
    assert report["n"] == 8 and sum(map(sum, report["confusion_matrix"])) == 8
    assert report["split"] == "val" and "the training run's val split" in report["scored"]
    assert (tmp_path / "cm.png").stat().st_size > 1000
    tables = run("eval", "--checkpoint", out_dir, "--data", synthetic_data, "--split", "train")
    assert tables.returncode == 0 and "Per class" in tables.stdout and "Confusion matrix" in tables.stdout
    # int8 scores what training measured for the int8 model on the same val split
    int8 = _eval_json("--checkpoint", out_dir, "--precision", "int8")
    assert int8["accuracy"] == pytest.approx(load_checkpoint(out_dir / "best.pt").metrics["val_acc_int8"])
    # the old spelling still works, with one line saying what replaces it
    old = run("eval", "--checkpoint", out_dir, "--no-amp", "--json")
    assert old.returncode == 0 and json.loads(old.stdout)["n"] == 8
    assert (
        old.stderr.strip()
        == "Warning: --no-amp is deprecated and will be removed in the next release; use --precision fp32."
    )


def test_data_synth(tmp_path):
    out = run("data", "synth", tmp_path / "s", "--per-class", "8", "--image-size", "32")
    assert out.returncode == 0
    assert len(list((tmp_path / "s").rglob("*.jpg"))) == 16
    again = run("data", "synth", tmp_path / "s")
    assert again.returncode == 1 and "not empty" in again.stderr


def _eval_json(*args, cwd=None) -> dict:
    out = run("eval", *args, "--json", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_eval_scores_every_image_of_a_folder_of_class_folders(synthetic_data, tiny_checkpoint, tmp_path):
    photos = tmp_path / "test_photos"  # another source: class folders, no split folders
    for c in ("cat", "dog"):
        for i, p in enumerate(sorted((synthetic_data / "train" / c).glob("*.jpg"))[:7]):
            (photos / c).mkdir(parents=True, exist_ok=True)
            (photos / c / f"{i}.jpg").write_bytes(p.read_bytes())
    out = run("eval", "--checkpoint", tiny_checkpoint, "--data", photos)
    assert out.returncode == 0, out.stderr
    assert f"scored on 14 images: every image in {photos}" in out.stdout
    report = _eval_json("--checkpoint", tiny_checkpoint, "--data", photos)
    assert report["n"] == 14 and report["split"] == "all"


@pytest.mark.parametrize("only", ["val", "test"])
def test_eval_on_a_folder_with_only_one_split_folder(synthetic_data, tiny_checkpoint, tmp_path, only):
    root = tmp_path / "photos"
    for c in ("cat", "dog"):
        (root / only / c).mkdir(parents=True)
        for p in sorted((synthetic_data / "train" / c).glob("*.jpg"))[:5]:
            (root / only / c / p.name).write_bytes(p.read_bytes())
    report = _eval_json("--checkpoint", tiny_checkpoint, "--data", root)
    assert report["n"] == 10 and report["split"] == only and report["classes"] == ["cat", "dog"]
    assert f"{only}/" in report["scored"]


def test_eval_on_the_training_data_needs_no_split_flags(synthetic_data, tmp_path):
    """A plain class-folder dataset split by --val-split/--seed: eval finds the run's own val split by itself."""
    import shutil

    from catdog_glm.config import TrainConfig
    from catdog_glm.vision.data import discover
    from catdog_glm.vision.trainer import train

    pets = tmp_path / "pets"
    for c in ("cat", "dog"):
        shutil.copytree(synthetic_data / "train" / c, pets / c)
    cfg = TrainConfig(
        data=str(pets),
        output=str(tmp_path / "run"),
        arch="resnet18",
        pretrained="none",
        epochs=1,
        image_size=32,
        val_split=0.25,
        seed=7,
        tracker="none",
        progress=False,
        workers=0,
        int8=False,
    )
    train(cfg)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    val = discover(pets, val_split=0.25, seed=7).split("val")
    assert len(val) == 6
    for args, cwd in (
        (["--checkpoint", tmp_path / "run"], None),
        (["--checkpoint", "run/best.pt", "--data", "pets"], tmp_path),
    ):
        report = _eval_json(*args, cwd=cwd)  # no --data at all, then the data by another (relative) path
        assert report["n"] == len(val) and report["split"] == "val"
        assert "25% held out for val with seed 7" in report["scored"]
        assert report["accuracy"] == pytest.approx(best.metrics["val_acc"])
