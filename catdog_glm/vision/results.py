"""results.csv: one row per epoch, rewritten atomically after each (as Ultralytics writes it for every run)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from catdog_glm.vision.state_dict import write_atomic

RESULTS_NAME = "results.csv"
RESULTS_FIELDS = ["epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_s", "epoch_seconds"]


def epoch_row(
    epoch: int, *, train_loss: float, val_loss: float, val_acc: float, lr: float, images_per_s: float, seconds: float
) -> dict:
    """One epoch's row of results.csv (and of the run's history), rounded as the file keeps it."""
    return {
        "epoch": epoch,
        "train_loss": round(train_loss, 6),
        "val_loss": round(val_loss, 6),
        "val_acc": round(val_acc, 6),
        "lr": lr,
        "images_per_s": round(images_per_s, 3),
        "epoch_seconds": round(seconds, 2),
    }


def write_results_csv(path: Path, history: list[dict]) -> None:
    """The whole history as CSV at `path`, written atomically (a reader never sees half a file)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=RESULTS_FIELDS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in RESULTS_FIELDS})
    write_atomic(path, lambda f: f.write(text.getvalue().encode("utf-8")))
