"""Every training default, once. The resolved config is saved beside each run and inside every checkpoint."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from catdog_glm.errors import ConfigError

TRACKERS = ("swanlab", "none")
SWANLAB_MODES = ("local", "offline", "online", "disabled")
CACHE_MODES = ("auto", "ram", "none")
SCHEDULES = ("cosine", "constant")
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


@dataclass
class TrainConfig:
    # --- the book's recipe ---
    data: str = "data"
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # imagenet | none | PATH
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4  # Adam
    image_size: int = 256
    # --- data ---
    val_split: float = 0.2  # used when the data has no val split of its own
    train_limit: int = 0  # 0 = all; else a class-balanced seeded subset (quick experiments, tests)
    val_limit: int = 0
    cache: str = "auto"  # ram: keep decoded, resized images in memory; auto: ram when it fits
    workers: int = -1  # DataLoader workers; -1 = auto
    augment: bool = False  # random resized crop + horizontal flip (the book trains without)
    # --- speed and quality beyond the book (each can be turned off) ---
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CPUs with native bf16, bf16/fp16 AMP on CUDA, else fp32
    channels_last: bool = True
    schedule: str = "cosine"  # cosine LR decay over the run, or constant as in the book
    patience: int = 5  # early stopping: epochs without a better val accuracy; 0 = off
    int8: bool = True  # at the end: calibrate int8 and record fp32/bf16/int8 val accuracy for fast CPU inference
    # --- bookkeeping ---
    output: str = "checkpoint"
    seed: int = 42
    resume: bool = False
    overwrite: bool = False
    tracker: str = "swanlab"
    swanlab_mode: str = "local"
    project: str = "catdog-glm"
    experiment: str = ""
    description: str = ""
    log_images: int = 16  # validation images logged with their predicted class
    progress: bool = True

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
        check_precision(self.precision, TRAIN_PRECISIONS, "training", "int8 is for inference: eval, predict, serve")
        need(not (self.resume and self.overwrite), "--resume and --overwrite contradict each other; pick one")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = dict(values)
        if "amp" in values and "precision" not in values:  # configs saved before --precision replaced --amp
            values["precision"] = "auto" if values["amp"] else "fp32"
        return cls(**{k: v for k, v in values.items() if k in known})


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
