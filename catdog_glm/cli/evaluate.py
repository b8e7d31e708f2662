"""`catdog eval`: a checkpoint and the images to score -> accuracy, per-class metrics, confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from catdog_glm.cli._common import AmpOption, CheckpointOption, console, legacy_precision, user_errors


def _header(evaluation, checkpoint: Path) -> str:
    skipped = len(evaluation.skipped_files)
    flip = " (each image and its mirror image: the run trained with --tta)" if evaluation.tta else ""
    return f"{checkpoint} scored on {evaluation.result.n} images{flip}: {evaluation.description}" + (
        f" ({skipped} unreadable file(s) skipped)" if skipped else ""
    )


def _tables(result) -> list[Table]:
    overview = Table(title="Overall", title_justify="left")
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
    checkpoint: CheckpointOption = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Images to score: the training run's dataset (default; its own val split is scored) or any "
            "folder of class folders (every image scored), with or without train/ val/ test/ split folders, or a "
            "dataset id (see `catdog data pull`)."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="val, train, test or all (default: the run's val split on its own data; elsewhere test/, "
            "then val/, then train/, or every image when there are no split folders)."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a confusion-matrix picture to this PNG file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="auto (as training validates: bf16 where the hardware has it, else fp32), fp32, bf16, fp16 (GPU) "
            "or int8 (CPU; checkpoints with calibration images)."
        ),
    ] = "auto",
    amp: AmpOption = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    val_split: Annotated[
        float | None,
        typer.Option(help="Share held out for val where the data has no val split (default: the run's own, or 0.2)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of that split (default: the run's own, or 42).")] = None,
    limit: Annotated[int, typer.Option(help="Evaluate a class-balanced subset of N images (0 = all).")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Evaluate a checkpoint: accuracy, loss, per-class precision/recall/F1 and the confusion matrix.

    Example: catdog eval --checkpoint checkpoint/best.pt --data test_photos --json
    """
    from catdog_glm.cli.data import resolve_data_option
    from catdog_glm.vision.checkpoint import resolve_checkpoint
    from catdog_glm.vision.evaluate import evaluate_checkpoint
    from catdog_glm.vision.plots import plot_confusion_matrix

    path = resolve_checkpoint(checkpoint)
    data = resolve_data_option(data, val_split=val_split, seed=seed)
    with Progress(console=console, disable=json_output, transient=True) as progress:
        task = progress.add_task("evaluating", total=None)
        evaluation = evaluate_checkpoint(
            path,
            data,
            split=split,
            batch_size=batch_size,
            device=device,
            precision=legacy_precision(precision, amp=amp),
            workers=workers,
            val_split=val_split,
            seed=seed,
            limit=limit,
            on_start=lambda n: progress.update(task, total=n),
            on_batch=lambda n: progress.advance(task, n),
        )
    result, images = evaluation.result, evaluation.images
    if plot:
        plot_confusion_matrix(
            result.confusion,
            result.classes,
            plot,
            title=f"{evaluation.checkpoint.arch} on {images.split} (acc {result.accuracy:.1%})",
        )
    if json_output:
        scored = {"data": str(images.root), "split": images.split, "scored": images.description}
        scored["tta"] = evaluation.tta
        payload = result.to_dict() | scored | {"checkpoint": str(path), "skipped_files": evaluation.skipped_files}
        typer.echo(json.dumps(payload))
        return
    console.print(_header(evaluation, path), highlight=False)
    for table in _tables(result):
        console.print(table)
    for line in evaluation.skipped_files:
        console.print(f"[yellow]skipped:[/] {line}", highlight=False)
    if plot:
        console.print(f"confusion matrix picture: {plot}")
