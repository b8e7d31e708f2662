"""The step after training: calibrate int8 on a few training images and measure fp32 / bf16 / int8 accuracy.

Predictors use bf16 and int8 by default only where these stay within half a point of fp32 on the model's own
validation split (see `quantize.within_tolerance`); the figures and the calibration images go into best.pt.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from catdog_glm.device import Precision, cpu_supports_bf16
from catdog_glm.vision.data import subsample
from catdog_glm.vision.evaluate import InferenceSpec, evaluate
from catdog_glm.vision.loader import ImageDataset, build_loader
from catdog_glm.vision.quantize import CALIBRATION_IMAGES, fold_batchnorm, int8_supported, quantize_int8

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def calibration_images(train_ds: ImageDataset, seed: int) -> torch.Tensor | None:
    """Up to CALIBRATION_IMAGES readable training images (uint8), a seeded class-balanced pick."""
    import torch

    wanted = {s.path for s in subsample(train_ds.samples, CALIBRATION_IMAGES, seed)}
    images = [train_ds.load(i) for i, s in enumerate(train_ds.samples) if s.path in wanted]
    images = [im for im in images if im is not None]
    return torch.stack(images).clone() if images else None


def calibrate(
    model,
    *,
    train_ds: ImageDataset,
    val_ds: ImageDataset,
    classes: list[str],
    spec: InferenceSpec,
    seed: int,
    arch: str = "",
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Validation accuracy of `model` (fp32, on the CPU, eval mode) in fp32, bf16 (native only) and int8, and the
    calibration images int8 used: ({"val_acc_fp32": ..., "val_acc_bf16": ..., "val_acc_int8": ...}, images).
    `spec` gives the normalization and test-time flip, as the run validated and as predictors of its checkpoint
    will run; device, precision and layout are the CPU's, per variant."""
    import torch

    cpu = torch.device("cpu")
    model = model.cpu().eval()
    loader = build_loader(val_ds, batch_size=32, shuffle=False, workers=0)

    def accuracy(m, precision: Precision, channels_last: bool = True) -> float:
        on_cpu = spec.replace(device=cpu, precision=precision, channels_last=channels_last)
        return evaluate(m, loader, classes=classes, spec=on_cpu).accuracy

    folded = fold_batchnorm(model)
    metrics = {"val_acc_fp32": accuracy(folded, Precision(None, False))}
    if cpu_supports_bf16():
        metrics["val_acc_bf16"] = accuracy(folded, Precision(torch.bfloat16, False))
    calibration = calibration_images(train_ds, seed)
    if calibration is not None and int8_supported():
        try:
            quantized = quantize_int8(model, calibration, spec.mean, spec.std)
            metrics["val_acc_int8"] = accuracy(quantized, Precision(None, False), channels_last=False)
        except Exception as e:  # an architecture FX cannot quantize keeps fp32/bf16
            log.warning("int8 quantization of %s failed (%s); int8 inference is off for it", arch or "the model", e)
    return metrics, calibration
