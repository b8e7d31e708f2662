"""`catdog train`: options -> TrainConfig -> vision.trainer.train -> progress bars and a summary table."""

from __future__ import annotations

import math
from pathlib import Path
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

from catdog_glm.cli._common import AmpOption, console, legacy_precision, user_errors
from catdog_glm.config import TrainConfig, apply_recipe, resume_options

D = TrainConfig()  # the defaults, shown in --help


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
def train(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Option(
            help="Dataset root: ImageFolder (train/ val/ or <class>/), train.csv + val.csv, or Kaggle-style "
            "cat.1.jpg files; or a dataset id, pulled on first use (see `catdog data pull`)."
        ),
    ] = D.data,
    epochs: Annotated[int, typer.Option(help="Number of epochs.")] = D.epochs,
    batch_size: Annotated[int, typer.Option(help="Images per training step.")] = D.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = D.lr,
    image_size: Annotated[int, typer.Option(help="Images are resized to SIZE x SIZE.")] = D.image_size,
    arch: Annotated[
        str,
        typer.Option(
            help="Any torchvision classifier (resnet50, resnet18, ...), efficientnet_lite0 (ImageNet weights "
            "embedded: fine-tunes offline) or any timm model as timm:NAME."
        ),
    ] = D.arch,
    pretrained: Annotated[
        str,
        typer.Option(
            help="Start weights: imagenet (torch hub cache; embedded for efficientnet_lite0), none, or a weights "
            "file PATH."
        ),
    ] = D.pretrained,
    output: Annotated[Path, typer.Option(help="Folder for best.pt, last.pt, results and the SwanLab log.")] = Path(
        D.output
    ),
    tracker: Annotated[str, typer.Option(help="Experiment tracker: swanlab or none.")] = D.tracker,
    swanlab_mode: Annotated[
        str, typer.Option(help="SwanLab mode: local (offline dashboard), offline, online or disabled.")
    ] = D.swanlab_mode,
    project: Annotated[str, typer.Option(help="SwanLab project name.")] = D.project,
    experiment: Annotated[str, typer.Option(help="SwanLab experiment name (default: arch and time).")] = "",
    description: Annotated[str, typer.Option(help="SwanLab experiment description.")] = "",
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")] = D.device,
    seed: Annotated[int, typer.Option(help="Random seed (data split, order, init).")] = D.seed,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in --output from last.pt (with a larger --epochs: train it further)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over even if --output holds a run.")] = False,
    val_split: Annotated[float, typer.Option(help="Validation fraction when the data has no val split.")] = D.val_split,
    train_limit: Annotated[int, typer.Option(help="Use a class-balanced subset of N training images (0 = all).")] = 0,
    val_limit: Annotated[int, typer.Option(help="Use a subset of N validation images (0 = all).")] = 0,
    cache: Annotated[
        str,
        typer.Option(
            help="auto (RAM when it fits), ram or none: keep decoded, resized images in memory after first use."
        ),
    ] = D.cache,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes (-1 = auto).")] = D.workers,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random resized crop and flip.")] = D.augment,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (bf16 on CPUs with native bf16, bf16/fp16 AMP on CUDA, else fp32), fp32, bf16 or fp16 (GPU)."
        ),
    ] = D.precision,
    amp: AmpOption = None,
    channels_last: Annotated[
        bool,
        typer.Option("--channels-last/--no-channels-last", help="channels_last memory format (faster convolutions)."),
    ] = D.channels_last,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule: cosine or constant (the book).")] = D.schedule,
    patience: Annotated[
        int, typer.Option(help="Early stopping after N epochs without a better val accuracy (0 = off).")
    ] = D.patience,
    recipe: Annotated[
        str,
        typer.Option(
            help="Preset for every option not given: book (fine-tuning, the defaults shown here), scratch (random "
            "weights: resnet18, 112 -> 160 px crops scored at 192 px, 80 epochs, AdamW, augmentation, mixup/cutmix, "
            "EMA, test-time flip; see the README) or auto (scratch with --pretrained none, else book)."
        ),
    ] = "auto",
    optimizer: Annotated[str, typer.Option(help="adam (the book) or adamw.")] = D.optimizer,
    weight_decay: Annotated[
        float, typer.Option(help="Weight decay (AdamW: not on norms and biases).")
    ] = D.weight_decay,
    warmup_epochs: Annotated[int, typer.Option(help="Linear learning-rate warmup over the first N epochs.")] = (
        D.warmup_epochs
    ),
    ema: Annotated[
        float, typer.Option(help="Keep an exponential moving average of the weights with this decay; 0 = off.")
    ] = D.ema,
    crop_scale: Annotated[float, typer.Option(help="With --augment: smallest share of an image a crop keeps.")] = (
        D.crop_scale
    ),
    auto_augment: Annotated[
        str, typer.Option(help="none, trivial (TrivialAugmentWide) or randaugment, after crop and flip.")
    ] = D.auto_augment,
    random_erasing: Annotated[float, typer.Option(help="Probability of blanking a random box of each image.")] = (
        D.random_erasing
    ),
    train_size: Annotated[
        int, typer.Option(help="Train at this size, validate and predict at --image-size (0 = the same).")
    ] = D.train_size,
    progressive_from: Annotated[
        int, typer.Option(help="Progressive resizing: start at this size, grow to the training size; 0 = off.")
    ] = D.progressive_from,
    mixup: Annotated[float, typer.Option(help="Mixup Beta alpha (0 = off).")] = D.mixup,
    cutmix: Annotated[float, typer.Option(help="CutMix Beta alpha (0 = off); with --mixup, one per batch.")] = (
        D.cutmix
    ),
    mix_prob: Annotated[float, typer.Option(help="Share of batches mixed by --mixup/--cutmix.")] = D.mix_prob,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")] = D.label_smoothing,
    tta: Annotated[
        bool, typer.Option("--tta/--no-tta", help="Test-time flip in validation (and later eval/predict).")
    ] = D.tta,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Fine-tune a classifier (default: the book's ResNet50 recipe) and track the run in SwanLab.

    Example: catdog train --data ../shared/data/catdog --epochs 1 --arch resnet18 --image-size 128 --pretrained none
    """
    from catdog_glm.cli.data import resolve_data_option
    from catdog_glm.vision.trainer import RunComplete, saved_run_config
    from catdog_glm.vision.trainer import train as run_training

    cfg = TrainConfig(
        data=resolve_data_option(data, val_split=val_split, seed=seed),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        image_size=image_size,
        arch=arch,
        pretrained=pretrained,
        output=str(output),
        tracker=tracker,
        swanlab_mode=swanlab_mode,
        project=project,
        experiment=experiment,
        description=description,
        device=device,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        val_split=val_split,
        train_limit=train_limit,
        val_limit=val_limit,
        cache=cache,
        workers=workers,
        augment=augment,
        precision=legacy_precision(precision, amp=amp),
        channels_last=channels_last,
        schedule=schedule,
        patience=patience,
        progress=progress,
        optimizer=optimizer,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        ema=ema,
        crop_scale=crop_scale,
        auto_augment=auto_augment,
        random_erasing=random_erasing,
        train_size=train_size,
        progressive_from=progressive_from,
        mixup=mixup,
        cutmix=cutmix,
        mix_prob=mix_prob,
        label_smoothing=label_smoothing,
        tta=tta,
    )
    # What the user typed always wins over the recipe. (typer vendors click: compare the source by name.)
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT"}
    saved = saved_run_config(output) if resume else None
    if saved is not None:  # --resume goes on with the run's own options, the recipe's included
        resume_options(cfg, saved, given)
    else:
        apply_recipe(cfg, recipe, given)
    try:
        result = run_training(cfg, RichTrainCallbacks(enabled=progress))  # the trainer closes the progress bars
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
