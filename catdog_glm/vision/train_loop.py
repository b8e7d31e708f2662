"""One training epoch and one validation pass, as functions (after timm's train.py): state in, numbers out.

The trainer (`vision/trainer.py`) owns the run around them: data, model, optimizer, checkpoints, tracking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from catdog_glm.vision.distributed import all_reduce_sum
from catdog_glm.vision.evaluate import EvalResult, InferenceSpec, evaluate, forward, prepare_batch


@dataclass
class EpochStats:
    loss: float  # mean training loss over the images seen
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(
    model,
    loader,
    optimizer,
    scaler,
    spec: InferenceSpec,
    *,
    mixer=None,
    label_smoothing: float = 0.0,
    ema=None,
    step: int = 0,
    on_step: Callable[[float, int], None] | None = None,
) -> EpochStats:
    """One pass over `loader`: forward, cross-entropy, backward, optimizer step. `on_step(loss, images)` after each
    step; a batch whose every file was unreadable reports (nan, 0) and is skipped.

    `mixer` (transforms.BatchMixer) turns labels into soft targets, mixing the batch's images by mixup or cutmix;
    `label_smoothing` as in F.cross_entropy; `ema` (timm's ModelEmaV3) is updated after every optimizer step, its
    decay warming up with the run's step count (`step`: optimizer steps taken before this epoch). `spec` says
    where and how batches run; its test-time flip is for scoring only and does not apply here.
    """
    import torch.nn.functional as F

    spec = spec.replace(tta=False)
    model.train()
    loss_sum, seen, started = 0.0, 0, time.perf_counter()
    for batch in loader:
        if batch is None:
            if on_step:
                on_step(float("nan"), 0)
            continue
        images, labels, _ = batch
        labels = labels.to(spec.device, non_blocking=True)
        x = prepare_batch(images, spec)
        target = labels
        if mixer is not None:
            x, target = mixer(x, labels)  # mixing normalized images is mixing pixels: the normalization is affine
        logits = forward(model, x, spec)
        loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        if ema is not None:
            ema.update(getattr(model, "module", model), step=step)  # the weights, not the DDP wrapper
        value = float(loss.detach())
        loss_sum += value * len(labels)
        seen += len(labels)
        if on_step:
            on_step(value, len(labels))
    return EpochStats(loss=loss_sum / max(seen, 1), images=seen, seconds=time.perf_counter() - started)


def validate(
    model,
    loader,
    *,
    classes: list[str],
    spec: InferenceSpec,
    world_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
    keep_predictions: bool = False,
) -> tuple[EvalResult, list]:
    """Loss and confusion matrix over `loader` (and, if asked, each sample's (index, probabilities)).

    Under torchrun every rank scores its own shard; the ranks' confusion matrices and loss sums are added up, so
    every rank returns the metrics of the whole validation split.
    """
    import torch

    out = evaluate(model, loader, classes=classes, spec=spec, on_batch=on_batch, keep_predictions=keep_predictions)
    result, predictions = out if keep_predictions else (out, [])
    if world_size > 1:
        packed = torch.cat([result.confusion.flatten().double(), torch.tensor([result.loss_sum])])
        packed = all_reduce_sum(packed, spec.device)
        k = len(classes)
        result = EvalResult(
            loss_sum=float(packed[-1]), confusion=packed[:-1].round().long().view(k, k), classes=classes
        )
    return result, predictions
