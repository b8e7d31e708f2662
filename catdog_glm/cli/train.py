"""`catdog train`: options -> TrainConfig -> vision.trainer.train -> progress bars and a summary table."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from catdog_glm.cli._common import AmpOption, config_options, console, legacy_precision, user_errors
from catdog_glm.config import TrainConfig, apply_recipe, resume_options


class RichTrainCallbacks:
    """Draws one progress bar per epoch with loss, images/s and ETA."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = None
        self.images = 0
        self.loss_avg = math.nan
        self.label = "final"  # until the first epoch starts (a resumed run may validate before any)

    def on_start(self, info: dict) -> None:
        resumed = f", resuming at epoch {info['start_epoch'] + 1}" if info["start_epoch"] else ""
        console.print(
            f"[bold]{info['arch']}[/] on {info['data']} ({info['layout']}): {info['train_images']} train / "
            f"{info['val_images']} val images, classes {', '.join(info['classes'])}\n"
            f"device {info['device']} · precision {info['precision']} · channels_last {info['channels_last']} · "
            f"cache {info['cache']} · workers {info['workers']} · weights {info['pretrained']}"
            + (f" · recipe {info['recipe']}" if info.get("recipe", "book") != "book" else "")
            + (f" · {info['world_size']} processes" if info["world_size"] > 1 else "")
            + resumed,
            highlight=False,
        )
        self.progress.start()

    def on_prepare(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(description, total=total, loss="-", speed="-")

    def on_prepare_advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        import time

        if self.task is not None:
            self.progress.remove_task(self.task)
        self.images, self.loss_avg, self.started = 0, math.nan, time.perf_counter()
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.task = self.progress.add_task(self.label, total=steps, loss="-", speed="-")

    def on_step(self, loss: float, images: int) -> None:
        import time

        self.images += images
        if not math.isnan(loss):
            self.loss_avg = loss if math.isnan(self.loss_avg) else 0.9 * self.loss_avg + 0.1 * loss
        speed = self.images / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=1, loss=f"{self.loss_avg:.4f}", speed=f"{speed:.1f}")

    def on_validate_start(self, n_images: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.label} · validating")

    def on_validate_batch(self, images: int) -> None: ...

    def on_epoch_end(self, row: dict) -> None:
        self.progress.console.print(
            f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} · val_loss {row['val_loss']:.4f} · "
            f"val_acc {row['val_acc']:.2%} · {row['images_per_s']:.1f} img/s · {row['epoch_seconds']:.0f}s",
            highlight=False,
        )

    def on_message(self, message: str) -> None:
        self.progress.console.print(f"[yellow]{message}[/]", highlight=False)

    def on_close(self) -> None:
        self.progress.stop()


def _summary(result) -> Table:
    table = Table(title="Training summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("epochs", f"{result.epochs_run}" + (" (early stop)" if result.stopped_early else ""))
    table.add_row("best val accuracy", f"{result.best_acc:.2%} (epoch {result.best_epoch})")
    table.add_row("test_acc / test_loss", f"{result.test_acc:.2%} / {result.test_loss:.4f}")
    if result.inference_accuracy:
        table.add_row(
            "CPU inference val acc",
            " · ".join(f"{k.removeprefix('val_acc_')} {v:.2%}" for k, v in result.inference_accuracy.items()),
        )
    table.add_row("training speed", f"{result.images_per_s:.1f} images/s (median epoch)")
    table.add_row("wall time", f"{result.seconds:.0f} s")
    table.add_row("checkpoints", f"{result.best_path}\n{result.last_path}")
    table.add_row("run files", f"{result.output}/args.yaml, results.csv, results.png, confusion_matrix.png")
    if result.corrupt_files:
        table.add_row("skipped files", f"{len(result.corrupt_files)} unreadable (listed above)")
    return table


@user_errors
@config_options(TrainConfig)  # every TrainConfig field with help is an option (config.py)
def train(
    ctx: typer.Context,
    amp: AmpOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
    **options,
) -> None:
    """Fine-tune a classifier (default: the book's ResNet50 recipe) and track the run in SwanLab.

    Example: catdog train --data ../shared/data/catdog --epochs 1 --arch resnet18 --image-size 128 --pretrained none
    """
    from catdog_glm.cli.data import resolve_data_option
    from catdog_glm.vision.trainer import RunComplete, saved_run_config
    from catdog_glm.vision.trainer import train as run_training

    recipe = options.pop("recipe")  # resolved below: apply_recipe records the preset it used
    cfg = TrainConfig(**options)
    cfg.data = resolve_data_option(cfg.data, val_split=cfg.val_split, seed=cfg.seed)
    cfg.precision = legacy_precision(cfg.precision, amp=amp)
    # What the user typed always wins over the recipe. (typer vendors click: compare the source by name.)
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT"}
    saved = saved_run_config(cfg.output) if cfg.resume else None
    if saved is not None:  # --resume goes on with the run's own options, the recipe's included
        resume_options(cfg, saved, given)
    else:
        apply_recipe(cfg, recipe, given)
    try:
        result = run_training(cfg, RichTrainCallbacks(enabled=cfg.progress))  # the trainer closes the progress bars
    except RunComplete as done:  # --resume on a finished run: nothing to do, and not an error
        console.print(str(done), highlight=False, soft_wrap=True)
        return
    if result is None:  # a non-zero torchrun rank
        return
    for line in result.corrupt_files:
        console.print(f"[yellow]skipped:[/] {line}", highlight=False)
    console.print(_summary(result))
    if result.swanlab_logdir:
        console.print(
            f"SwanLab log: {result.swanlab_logdir}\nView it offline: [bold]swanlab watch {result.swanlab_logdir}[/]",
            highlight=False,
        )
