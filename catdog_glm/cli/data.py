"""`catdog data ...`: pull a dataset by name, list pulled ones, look at one before training, or draw a small one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from catdog_glm.cli._common import console, fail, user_errors
from catdog_glm.config import TrainConfig

D = TrainConfig()  # the split defaults `catdog train` uses, so that `--data ID` finds a default pull
app = typer.Typer(
    help="Pull a dataset by name, list pulled ones, check one, or draw a small one.", no_args_is_help=True
)


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


class _RichPullProgress:
    """A bytes bar for downloads catdog makes itself (hub clients draw their own) and an images bar."""

    def __init__(self, progress: Progress):
        self.progress, self.download, self.images = progress, None, None

    def on_bytes(self, total: int | None, done: int) -> None:
        if self.download is None:
            self.download = self.progress.add_task("downloading", total=total)
        self.progress.update(self.download, total=total, completed=done)

    def on_images(self, n: int) -> None:
        if self.images is None:
            self.images = self.progress.add_task("checking and writing images", total=None)
        self.progress.advance(self.images, n)

    def on_message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)


def pull_progress():
    """A rich Progress showing bytes (with sizes and speed) and images, and the callbacks that feed it."""
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    return progress, _RichPullProgress(progress)


@app.command("pull")
@user_errors
def pull(
    dataset: Annotated[
        str,
        typer.Argument(
            help="owner/name\\[@revision] (Hugging Face), modelscope:owner/name, kaggle:competition, "
            "kaggle:owner/dataset, or an https:// URL of a .zip or .tar.gz."
        ),
    ],
    out: Annotated[Path | None, typer.Option(help="Write here instead of catdog's dataset cache.")] = None,
    limit: Annotated[int, typer.Option(help="Keep at most N images per class and split (0 = all).")] = 0,
    val_split: Annotated[float, typer.Option(help="Validation share when the source has no val split.")] = D.val_split,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = D.seed,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of an archive URL's file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Pull again even if it is already pulled.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Download a dataset by name into train/<class>/ and val/<class>/ with a dataset.json; later runs need no network.

    Example: catdog data pull microsoft/cats_vs_dogs && catdog train --data microsoft/cats_vs_dogs
    """
    from catdog_glm.vision.datahub import pull_dataset

    progress, callbacks = pull_progress()
    with progress:
        result = pull_dataset(
            dataset,
            out=out,
            limit=limit,
            val_split=val_split,
            seed=seed,
            sha256=sha256,
            force=force,
            progress=callbacks,
        )
    m = result.manifest
    state = f"Pulled in {result.seconds:.1f} s" if result.downloaded else "Already pulled"
    counts = " · ".join(
        f"{split} " + ", ".join(f"{c} {n}" for c, n in per.items()) for split, per in m["counts"].items()
    )
    console.print(
        f"{state}: {m['id']}: {m['images']} images ({counts}) -> {result.path}", highlight=False, soft_wrap=True
    )
    if m["skipped"]:
        console.print(f"[yellow]{len(m['skipped'])} file(s) skipped[/] (listed in {result.path / 'dataset.json'})")
    # the id finds this folder only as pulled with the defaults (a --limit or another split has a folder of its own)
    by_id = not out and not limit and (val_split, seed) == (D.val_split, D.seed)
    console.print(
        f"Train on it:  catdog train --data {m['id'] if by_id else result.path}", highlight=False, soft_wrap=True
    )


@app.command("list")
@user_errors
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """List pulled datasets: id, source, images, size, folder.

    Example: catdog data list --json
    """
    import json

    from catdog_glm.cli.models import _size
    from catdog_glm.vision.datahub import datasets_dir, list_datasets

    found = [d.to_dict() for d in list_datasets()]
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        console.print(
            f"No datasets pulled into {datasets_dir()} yet. Pull one: catdog data pull microsoft/cats_vs_dogs"
        )
        return
    table = Table("id", "source", "images", "size", "path")
    table.columns[4].overflow = "fold"
    for d in found:
        table.add_row(d["id"], d["source"], str(d["images"]), _size(d["size"]), d["path"])
    console.print(table)


def resolve_data_option(spec: str | None, *, val_split: float | None = None, seed: int | None = None) -> str | None:
    """A --data value as a folder: folders pass through; a dataset id comes from the cache, else is pulled (with
    progress bars), so `catdog train --data microsoft/cats_vs_dogs` needs nothing else."""
    if spec is None or Path(spec).expanduser().exists():
        return spec
    from catdog_glm.vision.datahub import DEFAULT_SEED, DEFAULT_VAL_SPLIT, resolve_data

    val_split = DEFAULT_VAL_SPLIT if val_split is None else val_split
    progress, callbacks = pull_progress()
    with progress:
        return resolve_data(spec, val_split=val_split, seed=DEFAULT_SEED if seed is None else seed, progress=callbacks)
