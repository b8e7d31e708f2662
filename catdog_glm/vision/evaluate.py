"""Running a classifier over a loader and turning its predictions into metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from catdog_glm.config import PRECISIONS, check_precision
from catdog_glm.device import Precision, autocast, inference_chunk_size, resolve_device, resolve_precision
from catdog_glm.errors import DataError
from catdog_glm.vision.checkpoint import ClassifierCheckpoint, build_model_from_checkpoint, load_checkpoint
from catdog_glm.vision.data import EvalImages, Sample, select_eval_images, subsample
from catdog_glm.vision.loader import ImageDataset, build_loader
from catdog_glm.vision.quantize import quantize_int8, require_int8
from catdog_glm.vision.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

if TYPE_CHECKING:
    import torch


@dataclass
class EvalResult:
    loss_sum: float
    confusion: torch.Tensor  # [true, predicted] counts
    classes: list[str]

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum()) / max(self.n, 1)

    def per_class(self) -> dict[str, dict[str, float]]:
        cm = self.confusion.double()
        out = {}
        for i, name in enumerate(self.classes):
            tp = float(cm[i, i])
            predicted, actual = float(cm[:, i].sum()), float(cm[i, :].sum())
            precision = tp / predicted if predicted else 0.0
            recall = tp / actual if actual else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}
        return out

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "n": self.n,
            "classes": self.classes,
            "per_class": self.per_class(),
            "confusion_matrix": self.confusion.tolist(),
        }


@dataclass(frozen=True)
class InferenceSpec:
    """How a model turns a uint8 batch into logits: on which device, in which precision and memory format,
    normalized with which mean and std, and whether each image is scored with its mirror image (test-time flip).
    One value for training, validation, evaluation and prediction alike."""

    device: torch.device
    precision: Precision
    channels_last: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    tta: bool = False

    def __post_init__(self) -> None:  # checkpoints hold lists; a frozen spec holds tuples
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def replace(self, **changes) -> InferenceSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_checkpoint(cls, checkpoint: ClassifierCheckpoint, device, mode: str) -> InferenceSpec:
        """How `checkpoint` runs on `device` in `mode` (fp32, bf16, fp16 or int8): int8 is a quantized CPU graph
        in fp32 and contiguous layout; the others autocast in channels_last. Scored with test-time flip when the
        run that made it was (the scratch recipe)."""
        if mode == "int8":
            precision, channels_last = Precision(None, False), False
        else:
            precision, channels_last = resolve_precision(device, mode), True
        tta = bool((checkpoint.config or {}).get("tta"))
        return cls(device, precision, channels_last, checkpoint.mean, checkpoint.std, tta)


def prepare_batch(batch_uint8, spec: InferenceSpec):
    """A uint8 batch as the normalized float tensor the model takes, on the spec's device and in its layout."""
    import torch

    x = normalize_batch(batch_uint8.to(spec.device, non_blocking=True), spec.mean, spec.std)
    return x.contiguous(memory_format=torch.channels_last) if spec.channels_last else x


def forward(model, x, spec: InferenceSpec):
    """float32 logits of a prepared batch; with `spec.tta` (test-time flip) the mean of the logits of the batch and
    of its mirror image, the cheapest test-time augmentation and the one that never hurts a cat or a dog."""
    with autocast(spec.device, spec.precision):
        if not spec.tta:
            return model(x).float()
        return (model(x).float() + model(x.flip(3)).float()) / 2


def run_model(model, batch_uint8, spec: InferenceSpec):
    """Normalize a uint8 batch as `spec` says and return float32 logits (the one forward used everywhere)."""
    return forward(model, prepare_batch(batch_uint8, spec), spec)


def infer_logits(model, batch_uint8, spec: InferenceSpec):
    """`run_model` for inference (eval mode, no gradients): the batch in chunks of the size the device runs
    fastest (see `device.inference_chunk_size`); the same logits as one forward of the whole batch, up to rounding."""
    import torch

    chunk = inference_chunk_size(spec.device) or len(batch_uint8)
    if len(batch_uint8) <= chunk:
        return run_model(model, batch_uint8, spec)
    return torch.cat([run_model(model, part, spec) for part in batch_uint8.split(chunk)])


def evaluate(model, loader, *, classes: list[str], spec: InferenceSpec, on_batch=None, keep_predictions: bool = False):
    """Loss and confusion matrix of `model` over `loader`; optionally the (index, probabilities) of each sample.
    With `spec.tta` each image is scored by the mean logits of it and its mirror image (as the run that made the
    model did)."""
    import torch
    import torch.nn.functional as F

    k = len(classes)
    confusion = torch.zeros(k, k, dtype=torch.long)
    loss_sum = 0.0
    predictions: list[tuple[int, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            images, labels, indices = batch
            logits = infer_logits(model, images, spec).cpu()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            predicted = logits.argmax(1)
            confusion += torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
            if keep_predictions:
                probs = logits.softmax(1)
                predictions += list(zip(indices.tolist(), probs, strict=True))
            if on_batch:
                on_batch(len(labels))
    model.train(was_training)
    result = EvalResult(loss_sum=loss_sum, confusion=confusion, classes=list(classes))
    return (result, predictions) if keep_predictions else result


@dataclass
class CheckpointEvaluation:
    """What `evaluate_checkpoint` scored and how the checkpoint did on it."""

    result: EvalResult
    checkpoint: ClassifierCheckpoint
    images: EvalImages  # which images were scored (root, split, a sentence saying so)
    skipped_files: list[str]

    @property
    def description(self) -> str:
        return self.images.description

    @property
    def tta(self) -> bool:
        """Whether each image was scored with its mirror image (test-time flip), as the training run validated."""
        return bool(self.checkpoint.config.get("tta"))


def evaluate_checkpoint(
    checkpoint_path,
    data=None,
    *,
    split: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    workers: int = 0,
    val_split: float | None = None,
    seed: int | None = None,
    limit: int = 0,
    on_start=None,
    on_batch=None,
) -> CheckpointEvaluation:
    """Score a checkpoint on the images `select_eval_images` picks under `data` (default: the run's own dataset,
    where its val split is scored); dataset classes are matched to the checkpoint's by name.

    `precision`: auto (as training validated: bf16 where the hardware has it, else fp32), fp32, bf16, fp16 (GPU)
    or int8 (the calibrated int8 model predictors run, on a CPU).
    """
    import torch

    check_precision(precision, PRECISIONS, "eval")
    ckpt = load_checkpoint(checkpoint_path)
    training = {**ckpt.config, "data_root": ckpt.dataset.get("root")}
    if data is None:
        data = ckpt.dataset.get("root") or ckpt.config.get("data")
        if not data:
            raise DataError(f"{checkpoint_path} does not record its training data; pass --data FOLDER")
    images = select_eval_images(data, split=split, training=training, val_split=val_split, seed=seed)
    unknown = sorted({c for _, c in images.samples} - set(ckpt.classes))
    if unknown:
        raise DataError(
            f"{data} has classes {unknown} that the checkpoint does not know (it was trained on {ckpt.classes})"
        )
    samples = [Sample(path, ckpt.classes.index(c)) for path, c in images.samples]
    samples = subsample(samples, limit, seed if seed is not None else int(ckpt.config.get("seed", 42)))
    if not samples:
        raise DataError(f"{images.description} holds no images")
    if limit and len(samples) < len(images.samples):
        images.description += f", a class-balanced subset of {len(samples)}"
    dev = resolve_device(device)
    if precision == "int8":
        require_int8(dev, ckpt.calibration)
        model = quantize_int8(build_model_from_checkpoint(ckpt), ckpt.calibration, ckpt.mean, ckpt.std)
    else:
        model = build_model_from_checkpoint(ckpt).to(dev).to(memory_format=torch.channels_last)
    # Scored as the training run's final validation did (with test-time flip when it used it).
    spec = InferenceSpec.for_checkpoint(ckpt, dev, precision)
    ds = ImageDataset(samples, ckpt.image_size)
    loader = build_loader(ds, batch_size=batch_size, shuffle=False, workers=workers)
    if on_start:
        on_start(len(samples))
    result = evaluate(model, loader, classes=ckpt.classes, spec=spec, on_batch=on_batch)
    return CheckpointEvaluation(result=result, checkpoint=ckpt, images=images, skipped_files=ds.corrupt_files())
