"""The classifier checkpoint format: self-describing, atomically written, loaded without running code.

A checkpoint is one `torch.save` file holding only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: architecture, class names, image size, mean/std, training config, metrics and
library versions travel with the weights, and eval/predict/serve need nothing but its path. The book's bare
`state_dict` files (`latest_checkpoint.pth`) load too, with the architecture inferred from their keys.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catdog_glm.errors import CheckpointError
from catdog_glm.vision.model import build_model
from catdog_glm.vision.state_dict import clean_state_dict, safe_load, save_atomic, unwrap_state_dict
from catdog_glm.vision.transforms import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

FORMAT = "catdog-classifier"
FORMAT_VERSION = 1
BEST_NAME, LAST_NAME = "best.pt", "last.pt"
# The book trains on ImageFolder('cat', 'dog'): label 0 is cat, 1 is dog.
BOOK_CLASSES = ["cat", "dog"]


@dataclass
class ClassifierCheckpoint:
    arch: str
    classes: list[str]
    model_state: dict
    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = 0
    dataset: dict = field(default_factory=dict)  # the training data: root (absolute), layout, held_out share
    source: str = "catdog"  # or "bare-state-dict"
    calibration: Any = None  # uint8 (N, 3, S, S) training images for int8 calibration, when recorded
    raw: dict = field(default_factory=dict, repr=False)


def library_versions() -> dict[str, str]:
    import platform

    import torch
    import torchvision

    from catdog_glm import __version__

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading rightly refuses.
    return {
        "catdog_glm": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def checkpoint_payload(
    *,
    arch: str,
    classes: list[str],
    model_state: dict,
    image_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    config: dict | None = None,
    metrics: dict | None = None,
    epoch: int = 0,
    dataset: dict | None = None,
    training_state: dict | None = None,
    calibration=None,
) -> dict:
    """The dict a checkpoint file holds (plain values and tensors only)."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "classes": list(classes),
        "num_classes": len(classes),
        "image_size": int(image_size),
        "mean": list(mean),
        "std": list(std),
        "config": config or {},
        "metrics": metrics or {},
        "epoch": int(epoch),
        "dataset": dataset or {},
        "versions": library_versions(),
        "model": clean_state_dict(model_state),
    }
    if training_state:
        payload["training_state"] = training_state
    if calibration is not None:
        payload["calibration"] = calibration
    return payload


def save_checkpoint(path: str | Path, **fields) -> None:
    """Write a checkpoint atomically; `fields` as `checkpoint_payload` takes them."""
    save_atomic(checkpoint_payload(**fields), path)


def update_checkpoint(path: str | Path, *, metrics: dict | None = None, calibration=None) -> None:
    """Add metrics (merged) and calibration images to an existing catdog checkpoint, atomically."""
    path = Path(path)
    obj = safe_load(path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise CheckpointError(f"{path} is not a catdog checkpoint")
    obj["metrics"] = {**obj.get("metrics", {}), **(metrics or {})}
    if calibration is not None:
        obj["calibration"] = calibration
    save_atomic(obj, path)


_RESNET_DEPTHS = {  # (blocks per stage, bottleneck) -> torchvision name
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


def infer_resnet_arch(state: dict) -> str | None:
    """Recognise a torchvision ResNet from its state_dict keys (block counts per stage, bottleneck or not)."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    return _RESNET_DEPTHS.get((tuple(blocks), bottleneck))


def load_checkpoint(path: str | Path) -> ClassifierCheckpoint:
    """Load a catdog checkpoint or a bare torchvision-ResNet state_dict (the book's latest_checkpoint.pth)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path} is an exported ONNX model, not a training checkpoint: `catdog predict --model {path.name}` and "
            "`catdog serve-classifier --model` run it; this command needs the checkpoint (best.pt)"
        )
    obj = safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if int(obj.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was written by a newer catdog-glm (format "
                f"{obj['format_version']}); upgrade catdog-glm to read it"
            )
        return ClassifierCheckpoint(
            arch=obj["arch"],
            classes=list(obj["classes"]),
            model_state=obj["model"],
            image_size=int(obj.get("image_size", DEFAULT_IMAGE_SIZE)),
            mean=tuple(obj.get("mean", IMAGENET_MEAN)),
            std=tuple(obj.get("std", IMAGENET_STD)),
            config=obj.get("config", {}),
            metrics=obj.get("metrics", {}),
            epoch=int(obj.get("epoch", 0)),
            dataset=obj.get("dataset", {}),
            calibration=obj.get("calibration"),
            source="catdog",
            raw=obj,
        )
    state = unwrap_state_dict(obj, path)
    arch = infer_resnet_arch(state)
    head = state.get("fc.weight")
    if arch is None or head is None:
        raise CheckpointError(
            f"{path} is a state_dict but not of a torchvision ResNet this tool can recognise; "
            "train with `catdog train` to get a self-describing checkpoint"
        )
    n = head.shape[0]
    classes = BOOK_CLASSES if n == 2 else [f"class_{i}" for i in range(n)]
    log.info("%s: bare state_dict, inferred %s with classes %s", path, arch, classes)
    return ClassifierCheckpoint(arch=arch, classes=classes, model_state=state, source="bare-state-dict")


def build_model_from_checkpoint(ckpt: ClassifierCheckpoint):
    """The checkpoint's model with its weights loaded, in eval mode, on the CPU."""
    model = build_model(ckpt.arch, len(ckpt.classes))
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint weights do not fit {ckpt.arch} with {len(ckpt.classes)} classes: {str(e).splitlines()[0]}"
        ) from e
    return model.eval()


def find_checkpoint(folder: str | Path, which: str = BEST_NAME) -> Path:
    """`folder/best.pt` (or the named file); accepts a file path as is."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        return folder
    if not folder.exists():
        if folder.suffix.lower() == ".onnx":
            raise CheckpointError(
                f"model {folder} does not exist; export one with `catdog export classifier --out {folder}`"
            )
        raise CheckpointError(
            f"checkpoint {folder} does not exist; train one with `catdog train` or pass --checkpoint PATH"
        )
    for name in (which, LAST_NAME, "latest_checkpoint.pth"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no checkpoint found in {folder}; train one with `catdog train` or pass --checkpoint")


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The file a `--checkpoint` option names: `find_checkpoint(path)`, or `default_checkpoint()` when not given."""
    return find_checkpoint(path) if path else default_checkpoint()


def default_checkpoint(root: str | Path = "checkpoint") -> Path:
    """The best checkpoint under `root`: root/best.pt, else the newest best.pt (then last.pt) below it."""
    root = Path(root)
    if (root / BEST_NAME).is_file():
        return root / BEST_NAME
    for name in (BEST_NAME, LAST_NAME, "latest_checkpoint.pth"):
        found = sorted(root.rglob(name), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
        if found:
            return found[0]
    raise CheckpointError(f"no checkpoint found under {root}/; train one with `catdog train` or pass --checkpoint PATH")
