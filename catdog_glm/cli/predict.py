"""`catdog predict`: images -> labels and probabilities, as a table, JSON lines or CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from catdog_glm.cli._common import ClassifierModelOption, PrecisionOption, console, err_console, user_errors


@user_errors
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns.")],
    checkpoint: ClassifierModelOption = None,
    top_k: Annotated[int, typer.Option(help="Show the K most likely classes (0 = all).")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")] = False,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Also write the rows to this CSV file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: PrecisionOption = "auto",
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this.")] = 64_000_000,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Predict the class of images with a trained checkpoint (PyTorch) or an exported .onnx model (ONNX Runtime).

    Example: catdog predict ../shared/data/catdog/val --json   (or --model catdog.onnx for ONNX Runtime)
    """
    from catdog_glm.errors import ConfigError
    from catdog_glm.vision.checkpoint import resolve_checkpoint
    from catdog_glm.vision.predictor import load_predictor, resolve_inputs

    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0, got {top_k}")
    path = resolve_checkpoint(checkpoint)
    files, failures = resolve_inputs(inputs)
    predictor = load_predictor(path, device=device, precision=precision, max_pixels=max_pixels)
    classes = predictor.classes if not top_k else None
    results = list(failures)
    with Progress(console=err_console, transient=True, disable=len(files) < 2 * batch_size) as progress:
        task = progress.add_task("predicting", total=len(files))
        for prediction in predictor.predict_files(
            files, batch_size=batch_size, on_progress=lambda n: progress.advance(task, n)
        ):
            results.append(prediction)
            if json_output:
                typer.echo(json.dumps(prediction.to_dict(top_k or None), ensure_ascii=False))
    if json_output:
        for failure in failures:
            typer.echo(json.dumps(failure.to_dict()))
    else:
        table = Table(title=f"{len(files)} image(s) · {path}", title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("label")
        for name in classes or [f"top {i + 1}" for i in range(top_k)]:
            table.add_column(name, justify="right")
        for p in results:
            if p.ok:
                cells = (
                    [f"{p.probabilities[c]:.3f}" for c in classes]
                    if classes
                    else [f"{c} {v:.3f}" for c, v in p.top(top_k).items()]
                )
                table.add_row(p.file, p.label, *cells)
        console.print(table)
        for p in results:
            if not p.ok:
                err_console.print(f"[red]failed:[/] {p.error}", highlight=False, soft_wrap=True)
    if csv_path:
        _write_csv(csv_path, results, predictor.classes)
    if any(not p.ok for p in results):
        raise typer.Exit(1)


def _write_csv(path: Path, results, classes: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", *classes, "error"])
        for p in results:
            probs = [f"{p.probabilities[c]:.6f}" if p.ok else "" for c in classes]
            writer.writerow([p.file, p.label or "", *probs, p.error or ""])
