"""`catdog data ...`: look at a dataset before training on it, or make a small one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from catdog_glm.cli._common import console, fail, user_errors

app = typer.Typer(help="Check a dataset, or make a small drawn one for a first run.", no_args_is_help=True)


@app.command("check")
@user_errors
def check(
    root: Annotated[Path, typer.Argument(help="Dataset root (same layouts as `catdog train --data`).")],
    val_split: Annotated[float, typer.Option(help="Validation fraction when the data has no val split.")] = 0.2,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Decode every image: list unreadable files, class counts per split and image-size statistics.

    Example: catdog data check ../shared/data/catdog
    """
    from catdog_glm.vision.datacheck import check_dataset, count_files

    total = count_files(root, val_split=val_split)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("decoding", total=total)
        report = check_dataset(root, val_split=val_split, on_progress=lambda n: progress.advance(task, n))

    counts = Table(title=f"{report.root} ({report.layout})", title_justify="left")
    counts.add_column("split")
    for name in report.classes:
        counts.add_column(name, justify="right")
    counts.add_column("total", justify="right")
    for split, per_class in report.counts.items():
        counts.add_row(split, *(str(per_class[c]) for c in report.classes), str(sum(per_class.values())))
    console.print(counts)

    sizes = Table(title="Image sizes (pixels)", title_justify="left")
    for col in ("", "min", "median", "mean", "max"):
        sizes.add_column(col, justify="right")
    for axis, s in report.size_stats().items():
        if s:
            sizes.add_row(axis, *(f"{s[k]:.0f}" for k in ("min", "median", "mean", "max")))
    console.print(sizes)
    console.print("modes: " + ", ".join(f"{m} {n}" for m, n in sorted(report.modes.items())), highlight=False)
    for path in report.ignored_files:
        console.print(f"[dim]not an image, ignored:[/] {path}", highlight=False)
    if report.bad_files:
        console.print(f"[bold red]{len(report.bad_files)} unreadable file(s)[/] (training skips them):")
        for line in report.bad_files:
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]all {report.n_images} images decode[/]")


@app.command("synth")
@user_errors
def synth(
    root: Annotated[Path, typer.Argument(help="Folder to write train/ and val/ into.")],
    per_class: Annotated[int, typer.Option(help="Images per class (a quarter go to val).")] = 100,
    image_size: Annotated[int, typer.Option(help="Side of each square image in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Draw a small cat/dog dataset (ImageFolder layout) for a first run with no download.

    Example: catdog data synth data/synthetic && catdog train --data data/synthetic --arch resnet18 --pretrained none
    """
    from catdog_glm.vision.synthetic import make_synthetic_dataset

    if per_class < 4:
        raise fail("--per-class must be at least 4")
    if root.exists() and any(root.iterdir()):
        raise fail(f"{root} is not empty; choose a new folder")
    make_synthetic_dataset(root, per_class=per_class, image_size=image_size, seed=seed)
    console.print(f"wrote {2 * per_class} images to {root}")
