"""`torchrun --nproc-per-node 2 -m catdog_glm train` on CPU with gloo: one set of outputs, written by rank 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from catdog_glm.vision.checkpoint import load_checkpoint
from catdog_glm.vision.evaluate import evaluate_checkpoint
from tests.conftest import catdog_env, free_port

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_on_cpu(synthetic_data, tmp_path):
    out_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "catdog_glm",
        "train",
        "--data",
        str(synthetic_data),
        "--output",
        str(out_dir),
        "--epochs",
        "2",
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--pretrained",
        "none",
        "--tracker",
        "none",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        # --pretrained none brings the scratch recipe (EMA, mixup/cutmix, progressive resizing) under DDP too; without
        # its test-time flip, the per-epoch val_acc and `catdog eval` score the same way and can be compared.
        "--no-tta",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=catdog_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Training summary") == 1  # only rank 0 prints
    assert "2 processes" in done.stdout
    best = load_checkpoint(out_dir / "best.pt")
    assert not any(k.startswith("module.") for k in best.model_state)
    assert len((out_dir / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert (out_dir / "confusion_matrix.png").is_file()
    # The ranks' summed confusion matrices must equal one process evaluating the whole val split.
    single = evaluate_checkpoint(out_dir / "best.pt", synthetic_data, device="cpu").result
    assert single.n == 8
    assert best.metrics["val_acc"] == pytest.approx(single.accuracy)
    last = load_checkpoint(out_dir / "last.pt")
    assert last.raw["training_state"]["history"][-1]["epoch"] == 2
