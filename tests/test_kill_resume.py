"""A training process killed with SIGKILL mid-run resumes to the same end as a run never interrupted."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import pytest

from catdog_glm.vision.checkpoint import load_checkpoint
from tests.conftest import catdog_env

pytestmark = pytest.mark.slow

ARGS = [
    "--epochs",
    "4",
    "--arch",
    "resnet18",
    "--image-size",
    "48",
    "--pretrained",
    "none",
    "--tracker",
    "none",
    "--workers",
    "0",
    "--patience",
    "0",
    "--seed",
    "5",
    "--no-progress",
]


def _train(data, output, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "catdog_glm", "train", "--data", str(data), "--output", str(output), *ARGS, *extra],
        env=catdog_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rows(path):
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [(r["epoch"], r["train_loss"], r["val_loss"], r["val_acc"]) for r in csv.DictReader(f)]


def test_sigkill_then_resume_matches_uninterrupted(synthetic_data, tmp_path):
    whole = _train(synthetic_data, tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    victim = _train(synthetic_data, tmp_path / "killed")
    deadline = time.monotonic() + 300
    while len(_rows(tmp_path / "killed" / "results.csv")) < 1 and victim.poll() is None:
        assert time.monotonic() < deadline, "training never finished its first epoch"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    done = len(_rows(tmp_path / "killed" / "results.csv"))
    assert 1 <= done < 4, "the kill should land mid-run"
    assert load_checkpoint(tmp_path / "killed" / "last.pt").epoch == done  # intact after SIGKILL

    resumed = _train(synthetic_data, tmp_path / "killed", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    assert _rows(tmp_path / "killed" / "results.csv") == _rows(tmp_path / "whole" / "results.csv")
    assert not list((tmp_path / "killed").glob(".*.tmp"))
