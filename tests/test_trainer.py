"""The training loop on tiny drawn data: run files, corrupt files skipped, resume equals an unbroken run."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest

from catdog_glm.config import TrainConfig
from catdog_glm.errors import ConfigError
from catdog_glm.vision import trainer as trainer_module
from catdog_glm.vision.checkpoint import load_checkpoint
from catdog_glm.vision.tracking import Tracker
from catdog_glm.vision.trainer import RunComplete, TrainCallbacks, train
from tests.conftest import catdog_env


def _cfg(data, output, **overrides) -> TrainConfig:
    values = dict(
        data=str(data),
        output=str(output),
        arch="resnet18",
        pretrained="none",
        epochs=2,
        image_size=32,
        batch_size=8,
        tracker="none",
        workers=0,
        progress=False,
        patience=0,
        seed=3,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _rows(path):
    with open(path, newline="") as f:
        return [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "val_acc")} for r in csv.DictReader(f)]


def test_a_run_leaves_checkpoints_config_results_and_pictures(synthetic_data, tmp_path):
    result = train(_cfg(synthetic_data, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("best.pt", "last.pt", "args.yaml", "results.csv", "results.png", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert len(_rows(out / "results.csv")) == 2 == result.epochs_run
    best = load_checkpoint(out / "best.pt")
    assert best.classes == ["cat", "dog"] and best.arch == "resnet18" and best.image_size == 32
    assert best.config["epochs"] == 2 and "val_acc" in best.metrics
    assert 0 <= result.test_acc <= 1 and result.images_per_s > 0
    assert "training_state" in load_checkpoint(out / "last.pt").raw
    assert "training_state" not in best.raw  # best.pt stays small: weights, metadata, calibration images
    assert best.calibration.shape == (24, 3, 32, 32)  # all 24 training images of this tiny set (max 32)
    assert {"val_acc_fp32", "val_acc_int8"} <= best.metrics.keys() == {*best.metrics} | {*result.inference_accuracy}
    assert all(0 <= v <= 1 for v in result.inference_accuracy.values())


def test_corrupt_files_are_skipped_and_listed(synthetic_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (data / "val" / "dog" / "empty.jpg").write_bytes(b"")
    result = train(_cfg(data, tmp_path / "run", epochs=1))
    assert len(result.corrupt_files) == 2
    assert any("broken.jpg" in line for line in result.corrupt_files)
    assert any("empty.jpg" in line and "empty file" in line for line in result.corrupt_files)


class _InterruptAfterFirstEpoch(TrainCallbacks):
    closed = False

    def on_epoch_end(self, row):
        raise KeyboardInterrupt  # Ctrl-C right after epoch 1 was saved

    def on_close(self):
        self.closed = True


class _RecordingTracker(Tracker):
    def __init__(self):
        self.finished = []

    def finish(self, state="success"):
        self.finished.append(state)


def _clean_run_folder(folder, epochs_saved: int):
    assert not list(folder.glob(".*.tmp")), "temp files left behind"
    assert load_checkpoint(folder / "last.pt").epoch == epochs_saved
    assert len(_rows(folder / "results.csv")) == epochs_saved


def test_resume_ends_where_an_uninterrupted_run_ends(synthetic_data, tmp_path):
    train(_cfg(synthetic_data, tmp_path / "whole", epochs=3, augment=True))
    interrupt = _InterruptAfterFirstEpoch()
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synthetic_data, tmp_path / "split", epochs=3, augment=True), interrupt)
    assert interrupt.closed
    _clean_run_folder(tmp_path / "split", 1)
    train(_cfg(synthetic_data, tmp_path / "split", epochs=3, augment=True, resume=True))
    assert _rows(tmp_path / "split" / "results.csv") == _rows(tmp_path / "whole" / "results.csv")


def test_a_failure_mid_epoch_closes_everything_and_leaves_a_clean_run(synthetic_data, tmp_path, monkeypatch):
    tracker = _RecordingTracker()
    monkeypatch.setattr(trainer_module, "build_tracker", lambda *a, **k: tracker)

    class FailInSecondEpoch(TrainCallbacks):
        epoch, closed = 0, False

        def on_epoch_start(self, epoch, epochs, steps):
            self.epoch = epoch

        def on_step(self, loss, images):
            if self.epoch == 1:
                raise RuntimeError("disk on fire")

        def on_close(self):
            self.closed = True

    callbacks = FailInSecondEpoch()
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(_cfg(synthetic_data, tmp_path / "run", epochs=3, tracker="swanlab"), callbacks)
    assert tracker.finished == ["crashed"] and callbacks.closed
    _clean_run_folder(tmp_path / "run", 1)


def test_best_is_never_read_back_during_a_run(synthetic_data, tmp_path, monkeypatch):
    """The saver keeps the best weights in memory: the final evaluation and int8 calibration load nothing."""
    from catdog_glm.vision import checkpoint, saver, state_dict

    def no_reads(path):
        raise AssertionError(f"read {path} back")

    for module in (checkpoint, saver, state_dict):
        monkeypatch.setattr(module, "safe_load", no_reads)
    written = []
    real_save = saver.save_atomic
    monkeypatch.setattr(saver, "save_atomic", lambda obj, path: (written.append(path.name), real_save(obj, path)))
    result = train(_cfg(synthetic_data, tmp_path / "run", epochs=2))
    best, improvements = -1.0, 0
    for row in result.history:
        if row["val_acc"] > best:
            best, improvements = row["val_acc"], improvements + 1
    assert written.count("last.pt") == 2
    assert written.count("best.pt") == improvements + 1  # once per new best, once more with the int8 figures
    monkeypatch.undo()
    assert "val_acc_int8" in load_checkpoint(tmp_path / "run" / "best.pt").metrics


def test_resume_of_a_finished_run_says_so_and_more_epochs_extend_it(synthetic_data, tmp_path):
    done = train(_cfg(synthetic_data, tmp_path / "run", epochs=2, int8=False))
    with pytest.raises(RunComplete, match="complete: it trained all 2 epochs"):
        train(_cfg(synthetic_data, tmp_path / "run", epochs=2, int8=False, resume=True))
    cli = [
        sys.executable,
        "-m",
        "catdog_glm",
        "train",
        "--data",
        str(synthetic_data),
        "--output",
        str(tmp_path / "run"),
    ]
    cli += ["--arch", "resnet18", "--pretrained", "none", "--image-size", "32", "--epochs", "2", "--tracker", "none"]
    out = subprocess.run([*cli, "--resume", "--no-progress"], capture_output=True, text=True, env=catdog_env())
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "complete" in out.stdout and len(out.stdout.strip().splitlines()) == 1
    longer = train(_cfg(synthetic_data, tmp_path / "run", epochs=3, int8=False, resume=True))
    assert longer.epochs_run == 3 and longer.history[:2] == done.history[:2]
    assert longer.history[2]["lr"] > 0  # the stretched schedule, not the old one's end (lr 0)


def test_existing_run_is_not_overwritten_by_accident(synthetic_data, tmp_path):
    train(_cfg(synthetic_data, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(synthetic_data, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="no .* to continue from"):
        train(_cfg(synthetic_data, tmp_path / "other", epochs=1, resume=True))


def test_early_stopping(synthetic_data, tmp_path):
    result = train(_cfg(synthetic_data, tmp_path / "run", epochs=6, patience=1, lr=1e-9))
    assert result.stopped_early and result.epochs_run < 6


@pytest.mark.parametrize(
    "bad",
    [dict(epochs=0), dict(batch_size=0), dict(lr=-1.0), dict(cache="disk"), dict(image_size=8), dict(tracker="wandb")],
)
def test_bad_options_are_refused_before_any_work(tmp_path, bad):
    with pytest.raises(ConfigError):
        train(_cfg(tmp_path, tmp_path / "run", **bad))
