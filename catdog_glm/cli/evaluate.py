"""`catdog eval`: a checkpoint and a dataset split -> accuracy, per-class metrics, confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from catdog_glm.cli._common import console, user_errors


def _tables(result, split: str, checkpoint: Path) -> list[Table]:
    overview = Table(title=f"{checkpoint} on {split}", title_justify="left")
    for col in ("images", "accuracy", "loss"):
        overview.add_column(col, justify="right")
    overview.add_row(str(result.n), f"{result.accuracy:.2%}", f"{result.loss:.4f}")

    per_class = Table(title="Per class", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="right" if col != "class" else "left")
    for name, m in result.per_class().items():
        per_class.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))

    confusion = Table(title="Confusion matrix (rows: true, columns: predicted)", title_justify="left")
    confusion.add_column("true \\ predicted")
    for name in result.classes:
        confusion.add_column(name, justify="right")
    for name, row in zip(result.classes, result.confusion.tolist(), strict=True):
        confusion.add_row(name, *(str(v) for v in row))
    return [overview, per_class, confusion]


@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file, or a folder holding best.pt.")] = Path(
        "checkpoint"
    ),
    data: Annotated[str, typer.Option(help="Dataset root (same layouts as `catdog train`).")] = "data",
    split: Annotated[str, typer.Option(help="Which split to evaluate: val, train or test.")] = "val",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a confusion-matrix picture to this PNG file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision where the device supports it.")] = True,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    val_split: Annotated[
        float, typer.Option(help="Validation fraction when the data has no val split (use the training run's value).")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split (use the training run's value).")] = 42,
    limit: Annotated[int, typer.Option(help="Evaluate a class-balanced subset of N images (0 = all).")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Evaluate a checkpoint: accuracy, loss, per-class precision/recall/F1 and the confusion matrix.

    Example: catdog eval --checkpoint checkpoint/best.pt --data ../shared/data/catdog --json
    """
    from catdog_glm.errors import ConfigError
    from catdog_glm.vision.checkpoint import find_checkpoint
    from catdog_glm.vision.evaluate import evaluate_checkpoint
    from catdog_glm.vision.plots import plot_confusion_matrix

    if split not in ("val", "train", "test"):
        raise ConfigError(f"--split must be val, train or test, got {split!r}")
    path = find_checkpoint(checkpoint)
    with Progress(console=console, disable=json_output, transient=True) as progress:
        task = progress.add_task("evaluating", total=None)
        result, ckpt, corrupt = evaluate_checkpoint(
            path,
            data,
            split=split,
            batch_size=batch_size,
            device=device,
            amp=amp,
            workers=workers,
            val_split=val_split,
            seed=seed,
            limit=limit,
            on_start=lambda n: progress.update(task, total=n),
            on_batch=lambda n: progress.advance(task, n),
        )
    if plot:
        plot_confusion_matrix(
            result.confusion, result.classes, plot, title=f"{ckpt.arch} on {split} (acc {result.accuracy:.1%})"
        )
    if json_output:
        payload = result.to_dict() | {"checkpoint": str(path), "split": split, "skipped_files": corrupt}
        typer.echo(json.dumps(payload))
        return
    for table in _tables(result, split, path):
        console.print(table)
    for line in corrupt:
        console.print(f"[yellow]skipped:[/] {line}", highlight=False)
    if plot:
        console.print(f"confusion matrix picture: {plot}")
