"""Every training default, once. The resolved config is saved beside each run and inside every checkpoint."""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields

from catdog_glm.errors import ConfigError

TRACKERS = ("swanlab", "none")
SWANLAB_MODES = ("local", "offline", "online", "disabled")
CACHE_MODES = ("auto", "ram", "none")
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "adamw")
AUTO_AUGMENTS = ("none", "trivial", "randaugment")
RECIPES = ("auto", "book", "scratch")  # auto: resolved by resolve_recipe before a TrainConfig holds it
# One --precision vocabulary for every command; each takes the values that make sense for it.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(
    value: str, allowed: tuple[str, ...], command: str, hint: str = "", option: str = "--precision"
) -> str:
    """`value` if it is one of `allowed`, else a ConfigError naming the values `command` takes (and why)."""
    if value not in PRECISIONS:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    if value not in allowed:
        raise ConfigError(
            f"{option} {value} does not apply to {command}{f' ({hint})' if hint else ''}; use {', '.join(allowed)}"
        )
    return value


def option(default, help: str, *, flags: tuple[str, ...] = (), cli_default=MISSING):
    """A config field that is also a command-line option: `help` is its --help text; `flags` its option names when
    not the field's own (`--name`, `--name/--no-name` for booleans); `cli_default` the CLI's default when it is not
    the field's (the CLI resolves it before the config holds a value). See `cli._common.config_options`."""
    metadata = {"help": help, "flags": flags}
    if cli_default is not MISSING:
        metadata["cli_default"] = cli_default
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """`catdog train`'s options, one field each (the CLI derives its options from these fields and their help);
    the fields without help are not options."""

    # --- the book's recipe ---
    data: str = option(
        "data",
        "Dataset root: ImageFolder (train/ val/ or <class>/), train.csv + val.csv, or Kaggle-style cat.1.jpg files; "
        "or a dataset id, pulled on first use (see `catdog data pull`).",
    )
    arch: str = option(
        "resnet50",
        "Any torchvision classifier (resnet50, resnet18, ...), efficientnet_lite0 (ImageNet weights embedded: "
        "fine-tunes offline) or any timm model as timm:NAME.",
    )
    pretrained: str = option(
        "imagenet",
        "Start weights: imagenet (torch hub cache; embedded for efficientnet_lite0), none, or a weights file PATH.",
    )
    epochs: int = option(20, "Number of epochs.")
    batch_size: int = option(8, "Images per training step.")
    lr: float = option(1e-4, "Peak learning rate.")
    optimizer: str = option("adam", "adam (the book) or adamw.")
    weight_decay: float = option(0.0, "Weight decay (AdamW: not on norms and biases).")
    image_size: int = option(256, "Images are resized to SIZE x SIZE.")
    # --- data ---
    val_split: float = option(0.2, "Validation fraction when the data has no val split.")
    train_limit: int = option(0, "Use a class-balanced subset of N training images (0 = all).")
    val_limit: int = option(0, "Use a subset of N validation images (0 = all).")
    cache: str = option(
        "auto", "auto (RAM when it fits), ram or none: keep decoded, resized images in memory after first use."
    )
    workers: int = option(-1, "DataLoader worker processes (-1 = auto).")
    augment: bool = option(False, "Random resized crop and flip.")  # the book trains without
    crop_scale: float = option(0.6, "With --augment: smallest share of an image a crop keeps.")
    auto_augment: str = option("none", "none, trivial (TrivialAugmentWide) or randaugment, after crop and flip.")
    random_erasing: float = option(0.0, "Probability of blanking a random box of each image.")
    # FixRes: train smaller than the model is scored and used at
    train_size: int = option(0, "Train at this size, validate and predict at --image-size (0 = the same).")
    progressive_from: int = option(0, "Progressive resizing: start at this size, grow to the training size; 0 = off.")
    mixup: float = option(0.0, "Mixup Beta alpha (0 = off).")
    cutmix: float = option(0.0, "CutMix Beta alpha (0 = off); with --mixup, one per batch.")
    mix_prob: float = option(1.0, "Share of batches mixed by --mixup/--cutmix.")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy.")
    # the final validation, eval and predict average an image and its mirror image
    tta: bool = option(False, "Test-time flip in validation (and later eval/predict).")
    # --- speed and quality beyond the book (each can be turned off) ---
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps.")
    precision: str = option(
        "auto", "auto (bf16 on CPUs with native bf16, bf16/fp16 AMP on CUDA, else fp32), fp32, bf16 or fp16 (GPU)."
    )
    channels_last: bool = option(True, "channels_last memory format (faster convolutions).")
    # closed-form cosine: resuming with a larger --epochs stretches the curve (see trainer.lr_schedule)
    schedule: str = option("cosine", "Learning-rate schedule: cosine or constant (the book).")
    warmup_epochs: int = option(0, "Linear learning-rate warmup over the first N epochs.")
    ema: float = option(0.0, "Keep an exponential moving average of the weights with this decay; 0 = off.")
    patience: int = option(5, "Early stopping after N epochs without a better val accuracy (0 = off).")
    # The step after training (vision/calibration.py): on by default, as predictors choose int8 or bf16 only where
    # this measured them within half a point of fp32. It costs a few minutes on a CPU; quick runs turn it off.
    int8: bool = option(
        True,
        "After training, calibrate int8 and measure fp32/bf16/int8 val accuracy on the CPU (minutes), so eval, "
        "predict and serve pick the fastest precision that keeps accuracy; --no-calibrate skips it (predictors "
        "of the run then use bf16 or fp32).",
        flags=("--calibrate/--no-calibrate",),
    )
    # --- bookkeeping ---
    # Which preset filled the options (a record: apply_recipe does the filling, as the CLI does before training).
    recipe: str = option(
        "book",
        "Preset for every option not given: book (fine-tuning, the defaults shown here), scratch (random weights: "
        "resnet18, 112 -> 160 px crops scored at 192 px, 80 epochs, AdamW, augmentation, mixup/cutmix, EMA, "
        "test-time flip; see the README) or auto (scratch with --pretrained none, else book).",
        cli_default="auto",
    )
    output: str = option("checkpoint", "Folder for best.pt, last.pt, results and the SwanLab log.")
    seed: int = option(42, "Random seed (data split, order, init).")
    resume: bool = option(
        False,
        "Continue the run in --output from last.pt (with a larger --epochs: train it further).",
        flags=("--resume",),
    )
    overwrite: bool = option(False, "Start over even if --output holds a run.", flags=("--overwrite",))
    tracker: str = option("swanlab", "Experiment tracker: swanlab or none.")
    swanlab_mode: str = option("local", "SwanLab mode: local (offline dashboard), offline, online or disabled.")
    project: str = option("catdog-glm", "SwanLab project name.")
    experiment: str = option("", "SwanLab experiment name (default: arch and time).")
    description: str = option("", "SwanLab experiment description.")
    log_images: int = 16  # validation images logged with their predicted class
    progress: bool = option(True, "Show progress bars.")

    def validate(self) -> TrainConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(16 <= self.image_size <= 1024, f"--image-size must be between 16 and 1024, got {self.image_size}")
        need(0 < self.val_split < 1, f"--val-split must be between 0 and 1, got {self.val_split}")
        need(self.train_limit >= 0 and self.val_limit >= 0, "--train-limit/--val-limit must be >= 0")
        need(self.cache in CACHE_MODES, f"--cache must be one of {', '.join(CACHE_MODES)}")
        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}")
        need(self.tracker in TRACKERS, f"--tracker must be one of {', '.join(TRACKERS)}")
        need(self.swanlab_mode in SWANLAB_MODES, f"--swanlab-mode must be one of {', '.join(SWANLAB_MODES)}")
        need(self.patience >= 0, f"--patience must be >= 0, got {self.patience}")
        need(
            self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
        )
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 < self.crop_scale <= 1, f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        need(
            self.auto_augment in AUTO_AUGMENTS,
            f"--auto-augment must be one of {', '.join(AUTO_AUGMENTS)}, got {self.auto_augment!r}",
        )
        need(
            0 <= self.random_erasing <= 1,
            f"--random-erasing must be a probability in [0, 1], got {self.random_erasing}",
        )
        need(
            self.train_size == 0 or 16 <= self.train_size <= self.image_size,
            f"--train-size must be 0 (= --image-size) or between 16 and --image-size {self.image_size}, "
            f"got {self.train_size}",
        )
        need(
            self.progressive_from == 0 or 16 <= self.progressive_from <= self.final_train_size,
            f"--progressive-from must be 0 (off) or between 16 and the training size {self.final_train_size}, "
            f"got {self.progressive_from}",
        )
        need(self.mixup >= 0 and self.cutmix >= 0, "--mixup/--cutmix are Beta alphas: 0 (off) or positive")
        need(0 <= self.mix_prob <= 1, f"--mix-prob must be a probability in [0, 1], got {self.mix_prob}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(
            self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
            (f"--warmup-epochs must be below --epochs {self.epochs}, got {self.warmup_epochs}"),
        )
        need(0 <= self.ema < 1, f"--ema is a decay in [0, 1) (0 = off; 0.998 is typical), got {self.ema}")
        need(self.recipe in RECIPE_DEFAULTS, f"recipe must be one of {', '.join(RECIPE_DEFAULTS)}, got {self.recipe!r}")
        check_precision(self.precision, TRAIN_PRECISIONS, "training", "int8 is for inference: eval, predict, serve")
        need(not (self.resume and self.overwrite), "--resume and --overwrite contradict each other; pick one")
        return self

    @property
    def final_train_size(self) -> int:
        """The size training ends at: --train-size, or --image-size when that is 0."""
        return self.train_size or self.image_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = dict(values)
        if "amp" in values and "precision" not in values:  # configs saved before --precision replaced --amp
            values["precision"] = "auto" if values["amp"] else "fp32"
        return cls(**{k: v for k, v in values.items() if k in known})


# Presets for `catdog train --recipe`: each fills the options the user did not set on the command line.
# `book` is the book's fine-tuning recipe (the TrainConfig defaults). `scratch` trains without pretrained weights
# (chosen by --pretrained none): a network that has seen nothing must learn cats and dogs from 1,200 photos, so it
# gets what generalizes on small data (strong augmentation, mixup/cutmix, label smoothing, AdamW, EMA) and a
# network, image size and batch size picked for CPU throughput. Measured in the README (recipe: from scratch).
RECIPE_DEFAULTS: dict[str, dict] = {
    "book": {},
    "scratch": {
        "pretrained": "none",
        "arch": "resnet18",
        "epochs": 80,
        "batch_size": 32,
        # Measured here: 128 px learns far faster per epoch than 64 px. Training crops grow from 112 to 160 px;
        # validation and prediction see the whole photo at 192 px, where the crops' objects appear at about the
        # size they had in training (FixRes: +2 points over scoring at 160 on a 65-epoch run).
        "image_size": 192,
        "train_size": 160,
        "progressive_from": 112,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "warmup_epochs": 3,
        "schedule": "cosine",
        "augment": True,
        "crop_scale": 0.35,
        "auto_augment": "none",  # TrivialAugment slowed learning too much for a 30-minute budget (see the README)
        "random_erasing": 0.25,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mix_prob": 0.5,
        "label_smoothing": 0.1,
        "ema": 0.998,
        "tta": True,
        "patience": 0,  # mixup makes single epochs' val accuracy noisy; the EMA weights at the end are the result
    },
}


def resolve_recipe(recipe: str, pretrained: str) -> str:
    """`auto` is `scratch` when training starts from random weights (--pretrained none), else `book`."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "auto":
        return "scratch" if pretrained in ("none", "") else "book"
    return recipe


def apply_recipe(cfg: TrainConfig, recipe: str, given: set[str]) -> TrainConfig:
    """`cfg` with `recipe` (book, scratch or auto) filling every option not in `given` (those the user set);
    what the user set always wins. The preset's warmup and sizes follow the run asked for: warmup at most a tenth
    of its epochs; training and starting sizes at the preset's shares of the image size and training size given."""
    cfg.recipe = resolve_recipe(recipe, cfg.pretrained)
    preset = RECIPE_DEFAULTS[cfg.recipe]
    for name, value in preset.items():
        if name not in given:
            setattr(cfg, name, value)
    if "warmup_epochs" not in given:
        cfg.warmup_epochs = min(cfg.warmup_epochs, cfg.epochs // 10)

    def share(of: int, name: str, base: str) -> int:  # preset[name] as a share of preset[base], applied to `of`
        size = int(round(of * preset[name] / preset[base] / 16)) * 16
        return size if 32 <= size < of else 0

    if "train_size" in preset and "train_size" not in given and "image_size" in given:
        cfg.train_size = share(cfg.image_size, "train_size", "image_size")
    if "progressive_from" in preset and "progressive_from" not in given:
        cfg.progressive_from = share(cfg.final_train_size, "progressive_from", "train_size")
    return cfg


def resume_options(cfg: TrainConfig, saved: dict, given: set[str]) -> TrainConfig:
    """`--resume`: `cfg` with every option the user did not type taken from the run being resumed (its saved
    config), so the run goes on as it began; what the user typed (a larger --epochs) still wins."""
    own = {"resume", "overwrite", "output", "progress"}  # about this invocation, not the run
    for f in fields(TrainConfig):
        if f.name in saved and f.name not in given and f.name not in own:
            setattr(cfg, f.name, saved[f.name])
    return cfg


_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | int, *, option: str, minimum: int = 1) -> int:
    """'10mb', '2GB', '1.5GiB', '512kb' or a byte count -> bytes (binary units), at least `minimum`."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
        if not match:
            raise ConfigError(f"{option} must look like 10mb, 2GB or a byte count, got {text!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < minimum:
        shown = f"{minimum // 2**20}MB" if minimum >= 2**20 else f"{minimum} byte(s)"
        raise ConfigError(f"{option} must be at least {shown}, got {text!r}")
    return size
