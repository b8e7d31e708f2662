"""One predictor for `catdog predict`, the Gradio page and the JSON API.

It loads a checkpoint once and runs batched inference under `torch.inference_mode()` with channels_last and,
where the hardware has native bf16, bf16 autocast. Preprocessing is `transforms.load_resized` +
`normalize_batch`, the very functions training and evaluation use. Decoding the next batch (threads; Pillow
releases the GIL) overlaps with the model working on the current one.

`load_predictor` picks the backend from the file: a `.onnx` model from `catdog export classifier` runs on ONNX
Runtime (`OnnxPredictor`), anything else is a checkpoint for PyTorch (`Predictor`). Both share the decoding,
batching and labelling of `BasePredictor` and differ only in `probabilities(batch_uint8)`.
"""

from __future__ import annotations

import glob
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from catdog_glm.config import PRECISIONS, check_precision
from catdog_glm.device import cpu_supports_bf16, resolve_device, resolve_onnx_providers, resolve_precision
from catdog_glm.errors import CheckpointError, ConfigError, ImageError
from catdog_glm.vision.checkpoint import ClassifierCheckpoint, build_model_from_checkpoint, load_checkpoint
from catdog_glm.vision.evaluate import InferenceSpec, infer_logits
from catdog_glm.vision.images import DEFAULT_MAX_PIXELS, is_image_file
from catdog_glm.vision.quantize import fold_batchnorm, int8_supported, quantize_int8, require_int8, within_tolerance
from catdog_glm.vision.transforms import load_resized, normalize_batch

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The result for one input: a label and class probabilities, or the reason it could not be read."""

    file: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def top(self, k: int | None) -> dict[str, float]:
        ranked = sorted(self.probabilities.items(), key=lambda kv: kv[1], reverse=True)
        return dict(ranked[:k] if k else ranked)

    def to_dict(self, top_k: int | None = None) -> dict:
        if not self.ok:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "label": self.label, "probabilities": self.top(top_k)}


class BasePredictor:
    """Decode, batch and label, shared by every backend; a backend sets the attributes below and implements
    `probabilities` and `info`."""

    classes: list[str]
    image_size: int
    max_pixels: int
    mode: str

    def info(self) -> dict:
        raise NotImplementedError

    # ---- the three steps: decode, forward, label ------------------------------------------------------------
    def load(self, source, name: str | None = None) -> torch.Tensor:
        """A path, bytes or file object -> uint8 CHW tensor, exactly as training preprocesses it."""
        return load_resized(source, self.image_size, max_pixels=self.max_pixels, name=name)

    def probabilities(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float32 class probabilities (N, classes) on the CPU: the backend's one step."""
        raise NotImplementedError

    def _label(self, name: str, probs) -> Prediction:
        values = [float(p) for p in probs]
        best = max(range(len(values)), key=values.__getitem__)
        return Prediction(
            file=name, label=self.classes[best], probabilities=dict(zip(self.classes, values, strict=True))
        )

    # ---- conveniences ---------------------------------------------------------------------------------------
    def predict_sources(self, sources: list, names: list[str] | None = None) -> list[Prediction]:
        """Predict a batch of paths/bytes; an unreadable item gets its error, the others their labels."""
        import torch

        names = names or [str(s) if isinstance(s, (str, Path)) else f"upload {i}" for i, s in enumerate(sources)]
        tensors, results = [], []
        for source, name in zip(sources, names, strict=True):
            try:
                tensors.append(self.load(source, name=name))
                results.append(None)
            except ImageError as e:
                results.append(Prediction(file=name, error=str(e)))
        if tensors:
            probs = iter(self.probabilities(torch.stack(tensors)))
            results = [r if r is not None else self._label(n, next(probs)) for r, n in zip(results, names, strict=True)]
        return results

    def predict_files(
        self, paths: Iterable[str | Path], *, batch_size: int = 32, on_progress: Callable[[int], None] | None = None
    ) -> Iterator[Prediction]:
        """Predict many files in batches, decoding batch i+1 in threads while the model runs batch i."""
        import torch

        paths = [str(p) for p in paths]
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]

        def decode(path: str):
            try:
                return self.load(path, name=path), None
            except ImageError as e:
                return None, str(e)

        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = [pool.submit(decode, p) for p in batches[0]] if batches else []
            for i, batch in enumerate(batches):
                decoded = [f.result() for f in pending]
                pending = [pool.submit(decode, p) for p in batches[i + 1]] if i + 1 < len(batches) else []
                good = [t for t, _ in decoded if t is not None]
                probs = iter(self.probabilities(torch.stack(good))) if good else iter(())
                for path, (tensor, error) in zip(batch, decoded, strict=True):
                    yield self._label(path, next(probs)) if tensor is not None else Prediction(file=path, error=error)
                if on_progress:
                    on_progress(len(batch))


class Predictor(BasePredictor):
    """A checkpoint run by PyTorch in fp32, bf16 autocast or int8."""

    def __init__(
        self,
        checkpoint: ClassifierCheckpoint,
        *,
        device: str = "auto",
        precision: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source: str = "",
    ):
        import torch

        check_precision(precision, PRECISIONS, "prediction")
        self.checkpoint = checkpoint
        self.source = source
        self.classes = list(checkpoint.classes)
        self.image_size = checkpoint.image_size
        self.max_pixels = max_pixels
        self.device = resolve_device(device)
        self.mode = self._choose_mode(precision)
        model = build_model_from_checkpoint(checkpoint)
        if self.mode == "int8":
            self.model = quantize_int8(model, checkpoint.calibration, checkpoint.mean, checkpoint.std)
        else:
            self.model = fold_batchnorm(model).to(self.device).to(memory_format=torch.channels_last)
        # A model trained with test-time flip (the scratch recipe) predicts as its validation scored it.
        self.spec = InferenceSpec.for_checkpoint(checkpoint, self.device, self.mode)
        self._lock = threading.Lock()  # one forward at a time: threads would only fight over the cores

    def _choose_mode(self, requested: str) -> str:
        """int8 / bf16 / fp16 / fp32. `auto` takes the fastest one that this checkpoint's own validation run showed to
        stay within half a point of fp32 accuracy (bf16 also where that was not recorded, e.g. the book's files)."""
        import torch

        metrics = self.checkpoint.metrics or {}
        on_cpu = self.device.type == "cpu"
        has_int8 = on_cpu and self.checkpoint.calibration is not None and int8_supported()
        if requested == "int8":
            require_int8(self.device, self.checkpoint.calibration)
            return "int8"
        if requested in ("fp32", "bf16", "fp16"):
            resolve_precision(self.device, requested)  # refuses fp16 on a CPU, bf16 on a GPU without it
            return requested
        if has_int8 and within_tolerance(metrics, "val_acc_int8"):
            return "int8"
        native_bf16 = (on_cpu and cpu_supports_bf16()) or (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        if native_bf16 and within_tolerance(metrics, "val_acc_bf16") is not False:
            return "bf16"
        return "fp32"

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> Predictor:
        return cls(load_checkpoint(path), source=str(path), **kwargs)

    def info(self) -> dict:
        metrics = self.checkpoint.metrics or {}
        return {
            "checkpoint": self.source,
            "arch": self.checkpoint.arch,
            "classes": self.classes,
            "image_size": self.image_size,
            "val_acc": metrics.get("best_acc", metrics.get("val_acc")),
            "device": str(self.device),
            "precision": self.mode,
        }

    def probabilities(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        import torch

        with self._lock, torch.inference_mode():
            logits = infer_logits(self.model, batch_uint8, self.spec)
            return logits.softmax(1).cpu()


class OnnxPredictor(BasePredictor):
    """A `.onnx` model from `catdog export classifier`, run by ONNX Runtime; classes and preprocessing come from
    the model's own metadata."""

    mode = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS):
        import onnxruntime

        from catdog_glm.vision.export import ExportMetadata

        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"model {path} does not exist; export one with `catdog export classifier`")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings (e.g. nodes left on the CPU) go to stderr
        # ORT's threads spin between runs by default; here they would take the cores from the threads decoding
        # the next batch (and burn CPU in an idle server). Measured: same throughput, a few ms less latency.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = _onnx_session(path, options, resolve_onnx_providers(device))
        self.metadata = ExportMetadata.from_dict(self.session.get_modelmeta().custom_metadata_map, path)
        self.source = str(path)
        self.classes = list(self.metadata.classes)
        self.image_size = self.metadata.image_size
        self.max_pixels = max_pixels
        self._lock = threading.Lock()  # one run at a time, as in Predictor

    def info(self) -> dict:
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        return {
            "checkpoint": self.source,
            "arch": self.metadata.arch,
            "classes": self.classes,
            "image_size": self.image_size,
            "val_acc": self.metadata.val_acc,
            "device": "cuda" if on_cuda else "cpu",
            "precision": self.mode,
        }

    def probabilities(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        import torch

        from catdog_glm.vision.export import INPUT_NAME, OUTPUT_NAME

        x = normalize_batch(batch_uint8, self.metadata.mean, self.metadata.std).numpy()
        with self._lock:
            (probs,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(probs)


def _onnx_session(path: Path, options, providers):
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile

    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except (InvalidProtobuf, InvalidGraph, Fail, NoSuchFile) as e:
        # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed." -> the cause
        detail = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .* failed:)?", "", str(e))
        detail = detail.strip().splitlines()[0] if detail.strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not an ONNX model ONNX Runtime can load ({detail}); pass a checkpoint or a .onnx file "
            "written by `catdog export classifier`"
        ) from e


def load_predictor(
    path: str | Path, *, device: str = "auto", precision: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
) -> BasePredictor:
    """The predictor for a model file: ONNX Runtime for `.onnx`, PyTorch for checkpoints."""
    if Path(path).suffix.lower() == ".onnx":
        if precision != "auto":
            raise ConfigError(
                f"--precision {precision} applies to PyTorch checkpoints; a .onnx model runs in the fp32 it was "
                "exported in, so leave --precision out (or pass the checkpoint to choose fp32, bf16 or int8)"
            )
        return OnnxPredictor(path, device=device, max_pixels=max_pixels)
    return Predictor.from_checkpoint(path, device=device, precision=precision, max_pixels=max_pixels)


def resolve_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[Prediction]]:
    """Files, folders (searched recursively for images) and glob patterns -> image paths, plus misses as errors."""
    found: list[Path] = []
    missing: list[Prediction] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.exists():
            found.append(path)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            files = [m for m in matches if m.is_file()]
            if files:
                found += files
            else:
                missing.append(Prediction(file=raw, error=f"{raw}: no file matches this pattern"))
        else:
            missing.append(Prediction(file=raw, error=f"{raw}: file not found"))
    seen, unique = set(), []
    for p in found:  # a file named twice is predicted once
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique, missing
