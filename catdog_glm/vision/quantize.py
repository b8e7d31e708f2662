"""Faster CPU inference: BatchNorm folding for fp32/bf16, and static int8 quantization with torch's x86 kernels.

int8 needs calibration images; the trainer stores a few training images in best.pt and records the int8,
bf16 and fp32 validation accuracies beside them, so a predictor picks int8 or bf16 only where they stay
within `ACCURACY_TOLERANCE` of fp32 on that model's own validation split.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ACCURACY_TOLERANCE = 0.005  # half a point of validation accuracy
CALIBRATION_IMAGES = 32


def fold_batchnorm(model):
    """Fold eval-mode BatchNorm into the preceding convolutions (same maths, a third fewer passes over memory)."""
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(copy.deepcopy(model).eval())
    except Exception as e:  # a model FX cannot trace keeps its BatchNorms
        log.info("BatchNorm folding skipped (%s)", e)
        return model


def int8_supported() -> bool:
    """torch's x86 int8 kernels are there (torch flags torch.ao.quantization for removal in a later release)."""
    import torch

    try:
        import torch.ao.quantization.quantize_fx  # noqa: F401
    except ImportError:
        return False
    return "x86" in torch.backends.quantized.supported_engines


def require_int8(device: torch.device, calibration) -> None:
    """Raise ConfigError unless int8 can run here: on a CPU with torch's x86 int8 kernels, for a checkpoint that
    carries calibration images."""
    from catdog_glm.errors import ConfigError

    if device.type != "cpu" or calibration is None or not int8_supported():
        raise ConfigError(
            "--precision int8 needs a CPU with torch's x86 int8 kernels and a checkpoint with calibration "
            "images (trained by this version of `catdog train`); use --precision bf16 or fp32"
        )


def quantize_int8(model, calibration_uint8: torch.Tensor, mean, std):
    """Static int8 quantization (per-channel weights, calibrated activations) for torch's x86 CPU kernels."""
    import torch

    torch.backends.quantized.engine = "x86"
    # torch flags these APIs as deprecated in favour of torchao; they are still its shipped x86 int8 kernels.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _quantize(model, calibration_uint8, mean, std)


def _quantize(model, calibration_uint8, mean, std):
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from catdog_glm.vision.transforms import normalize_batch

    model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    example = normalize_batch(calibration_uint8[:1], mean, std)
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs=(example,))
    with torch.no_grad():
        for chunk in calibration_uint8.split(16):
            prepared(normalize_batch(chunk, mean, std))
    return convert_fx(prepared)


def within_tolerance(metrics: dict, key: str) -> bool | None:
    """Whether metrics[key] (e.g. val_acc_int8) is within tolerance of val_acc_fp32; None when not recorded."""
    if key not in metrics or "val_acc_fp32" not in metrics:
        return None
    return abs(float(metrics[key]) - float(metrics["val_acc_fp32"])) <= ACCURACY_TOLERANCE
