"""The one place that probes hardware: which device to use and which precision it runs fast in."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from catdog_glm.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda|mps` into a torch.device: auto picks cuda, then mps, then cpu."""
    import torch

    name = (name or "auto").lower()
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available; use --device auto or cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", empty) where there is none (macOS, Windows)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux names them (avx2, avx512_vnni, amx_bf16, ...); empty elsewhere."""
    return _cpuinfo()[1]


def cpu_name() -> str:
    """The CPU's model name, for benchmark reports."""
    import platform

    return _cpuinfo()[0] or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 math (AVX512-BF16 or AMX), where bf16 autocast is a real speed-up.

    Without native support oneDNN emulates bf16 and autocast makes training slower, not faster.
    """
    if cpu_flags():
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    import torch

    # Other platforms (macOS, Windows): ask oneDNN.
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and bool(
        getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    )


@dataclass(frozen=True)
class Precision:
    """How to run a model on a device: the autocast dtype (None = plain fp32) and whether a GradScaler is needed."""

    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool

    @property
    def name(self) -> str:
        return "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", "")


def resolve_precision(device: torch.device, amp: bool | str = True) -> Precision:
    """The autocast precision for a device. `amp` is a --precision name or, as before, True (auto) / False (fp32):
    auto picks bf16 on CPUs with native bf16, bf16/fp16 AMP on CUDA, else fp32; fp32, bf16 and fp16 force one
    (fp16 needs a GPU: on a CPU it would be emulated, slow and less accurate)."""
    import torch

    name = ("auto" if amp else "fp32") if isinstance(amp, bool) else amp
    if name == "fp32":
        return Precision(None, False)
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU has no bf16; use --precision fp16 or fp32")
        return Precision(torch.bfloat16, False)
    if name == "fp16":
        if device.type not in ("cuda", "mps"):
            raise ConfigError(f"--precision fp16 needs a GPU (cuda or mps), not {device.type}; use bf16 or fp32")
        return Precision(torch.float16, device.type == "cuda")
    if name != "auto":
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16 here, got {name!r}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False)
        return Precision(torch.float16, True)
    if device.type == "cpu" and cpu_supports_bf16():
        return Precision(torch.bfloat16, False)
    return Precision(None, False)


def autocast(device: torch.device, precision: Precision):
    """A context manager that applies `precision` on `device` (a no-op for fp32)."""
    import contextlib

    import torch

    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


# Inference on a CPU runs fastest a few images at a time: the activations of 4 images at 256 px stay in cache,
# those of 32 do not. Measured here (2 cores, ResNet50, 256 px, images/s at batch 4 vs 32): fp32 33 vs 21,
# bf16 61 vs 38, int8 117 vs 95. GPUs want the whole batch.
CPU_INFERENCE_CHUNK = 4


def inference_chunk_size(device: torch.device) -> int | None:
    """How many images one inference forward should take on `device` (None: the whole batch at once)."""
    return CPU_INFERENCE_CHUNK if device.type == "cpu" else None


def resolve_onnx_providers(name: str = "auto") -> list[str | tuple[str, dict]]:
    """ONNX Runtime execution providers for `auto|cpu|cuda`: CUDA where this onnxruntime build has it (auto or
    cuda), with the CPU provider always last so operators CUDA lacks still run."""
    import onnxruntime

    name = (name or "auto").lower()
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise ConfigError(f"ONNX Runtime runs a .onnx model on cpu or cuda, not {name!r}; use --device auto or cpu")
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if name.startswith("cuda") and not has_cuda:
        raise ConfigError(
            "--device cuda was asked for but this onnxruntime has no CUDA provider (install onnxruntime-gpu); "
            "use --device auto or cpu"
        )
    if name.startswith("cuda") or (name == "auto" and has_cuda):
        index = name.partition(":")[2] or "0"
        if not index.isdigit():
            raise ConfigError(f"unknown device {name!r}; write cuda or cuda:N")
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


ONEDNN_SHAPES_KEPT = 32  # oneDNN kernels kept, one per GEMM shape (its default: 1024)
TRIM_EVERY_S = 10.0


def steady_memory() -> None:
    """Keep a long-running server's memory flat. Call before the first matmul (oneDNN reads its setting then).

    Measured on a soak of serve-chat (3,000 mixed requests, the embedded model in int4): the server's RSS grew
    250 MB with no Python objects growing. Two native causes: oneDNN keeps a JIT-compiled kernel per GEMM shape it
    has seen (up to 1,024; every new prompt-step size is a new shape), and glibc keeps freed heap memory (its mmap
    threshold rises each time a large block is freed, so later large tensors come from the heap and fragment it).
    Here: 32 shapes kept (rebuilding one costs well under a millisecond of a prompt step), and a daemon thread gives
    free heap pages back to the system every TRIM_EVERY_S seconds (`malloc_trim`). Holding the mmap threshold
    fixed instead cost 40% of throughput (every large tensor then faults in fresh pages). A user's own
    ONEDNN_PRIMITIVE_CACHE_CAPACITY wins."""
    import ctypes
    import ctypes.util
    import os
    import threading
    import time

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_SHAPES_KEPT))
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to give back this way
        return

    def give_back() -> None:
        while True:
            time.sleep(TRIM_EVERY_S)
            trim(0)

    threading.Thread(target=give_back, name="catdog-malloc-trim", daemon=True).start()
