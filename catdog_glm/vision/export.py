"""`catdog export classifier`: a checkpoint -> one ONNX (or TorchScript) file that describes itself.

The exported graph is the model plus its softmax: input `image`, the *normalized* float32 batch [N, 3, S, S]
(dynamic N), output `probabilities` [N, classes]. Decoding and resizing stay outside the graph on purpose: they are
Pillow's bilinear resize in `transforms.load_resized`, which no ONNX Resize reproduces bit for bit, and any runtime
can do `/255` and mean/std itself. What a runtime needs to do that — classes, image size, mean/std — travels in the
file: ONNX `metadata_props` (Netron shows them; ONNX Runtime reads them with `get_modelmeta()`), or a `catdog.json`
extra file in a TorchScript archive. `read_onnx_metadata` and the ONNX predictor read it back.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from catdog_glm.errors import CheckpointError, ConfigError
from catdog_glm.vision.checkpoint import ClassifierCheckpoint, build_model_from_checkpoint, load_checkpoint
from catdog_glm.vision.state_dict import write_atomic

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")
METADATA_FORMAT = "catdog-classifier-export"
METADATA_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
TORCHSCRIPT_METADATA_FILE = "catdog.json"
# protobuf cannot serialize a message over 2 GiB, so a bigger ONNX model would need an external data file.
_ONNX_MAX_BYTES = 2**31 - 2**26


@dataclass(frozen=True)
class ExportMetadata:
    """What a runtime needs besides the graph: the preprocessing and the meaning of each output."""

    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str
    source_checkpoint: str
    catdog_version: str
    val_acc: float | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: ClassifierCheckpoint, source: str) -> ExportMetadata:
        from catdog_glm import __version__

        metrics = ckpt.metrics or {}
        val_acc = metrics.get("best_acc", metrics.get("val_acc"))
        return cls(
            classes=list(ckpt.classes),
            image_size=int(ckpt.image_size),
            mean=tuple(float(m) for m in ckpt.mean),
            std=tuple(float(s) for s in ckpt.std),
            arch=ckpt.arch,
            source_checkpoint=source,
            catdog_version=__version__,
            val_acc=float(val_acc) if isinstance(val_acc, (int, float)) else None,
        )

    def to_dict(self) -> dict:
        """Plain values plus the format tag and a human-readable description of the input and output."""
        s = self.image_size
        return {
            "format": METADATA_FORMAT,
            "format_version": METADATA_VERSION,
            **asdict(self),
            "mean": list(self.mean),
            "std": list(self.std),
            "input": f"{INPUT_NAME}: float32 [N, 3, {s}, {s}] (NCHW), normalized",
            "preprocessing": f"RGB, resize to {s}x{s} (bilinear), /255, subtract mean, divide by std",
            "output": f"{OUTPUT_NAME}: float32 [N, {len(self.classes)}], softmax over classes in order",
        }

    def to_onnx_props(self) -> dict[str, str]:
        """metadata_props hold strings: strings as they are, everything else as JSON."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, values: Mapping, path: str | Path) -> ExportMetadata:
        """Validate metadata read back from an exported file (values may be JSON strings, as in ONNX)."""
        if values.get("format") != METADATA_FORMAT:
            raise CheckpointError(
                f"{path} has no catdog metadata, so its classes and preprocessing are unknown; export the model "
                "with `catdog export classifier --checkpoint best.pt --out model.onnx`"
            )

        def value(key: str):
            raw = values.get(key)
            try:
                return json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError:
                return raw

        try:
            version = int(value("format_version"))
            if version > METADATA_VERSION:
                raise CheckpointError(f"{path} was exported by a newer catdog-glm; upgrade catdog-glm to read it")
            meta = cls(
                classes=[str(c) for c in value("classes")],
                image_size=int(value("image_size")),
                mean=tuple(float(m) for m in value("mean")),
                std=tuple(float(s) for s in value("std")),
                arch=str(values.get("arch", "unknown")),
                source_checkpoint=str(values.get("source_checkpoint", "")),
                catdog_version=str(values.get("catdog_version", "")),
                val_acc=float(value("val_acc")) if value("val_acc") is not None else None,
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path} has damaged catdog metadata ({e}); export it again") from e
        if not meta.classes or meta.image_size < 1 or len(meta.mean) != 3 or len(meta.std) != 3:
            raise CheckpointError(f"{path} has incomplete catdog metadata; export it again")
        return meta


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    bytes: int
    classes: list[str]
    image_size: int
    seconds: float


def export_classifier(
    checkpoint: str | Path, out: str | Path, *, fmt: str = "onnx", overwrite: bool = False
) -> ExportResult:
    """Write the checkpoint's model (fp32, eval, + softmax) as one ONNX or TorchScript file, atomically."""
    fmt = (fmt or "").lower()
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'catdog.onnx'}")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    if fmt == "onnx" and out.suffix.lower() != ".onnx":
        log.warning("%s: `catdog predict --model` recognises ONNX models by the .onnx suffix", out)

    started = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    # A checkpoint trained with --tta (the scratch recipe) is exported with its test-time flip, as it predicts.
    model = _probability_model(build_model_from_checkpoint(ckpt), flip=bool(ckpt.config.get("tta")))
    meta = ExportMetadata.from_checkpoint(ckpt, source=str(checkpoint))
    if fmt == "onnx":
        _write_onnx(model, meta, out)
    else:
        _write_torchscript(model, meta, out)
    log.info("exported %s to %s (%s)", checkpoint, out, fmt)
    return ExportResult(
        path=out,
        format=fmt,
        bytes=out.stat().st_size,
        classes=meta.classes,
        image_size=meta.image_size,
        seconds=time.perf_counter() - started,
    )


def read_onnx_metadata(path: str | Path) -> ExportMetadata:
    """The catdog metadata of an exported .onnx file; CheckpointError if it is missing, not ONNX or not ours."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model {path} does not exist; export one with `catdog export classifier`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not an ONNX model ({type(e).__name__})") from e
    if not proto.graph.node:  # protobuf happily parses some non-ONNX bytes into an empty message
        raise CheckpointError(f"{path} is not an ONNX model (it has no graph)")
    return ExportMetadata.from_dict({p.key: p.value for p in proto.metadata_props}, path)


def _probability_model(model, flip: bool = False):
    """The model with its softmax (and, with `flip`, the mean logits of each image and its mirror image, as
    `evaluate.forward` does): every runtime then returns the same probabilities `catdog predict` shows."""
    import torch

    class ProbabilityModel(torch.nn.Module):
        def __init__(self, classifier):
            super().__init__()
            self.classifier = classifier

        def forward(self, image):
            logits = self.classifier(image)
            if flip:
                logits = (logits + self.classifier(image.flip(3))) / 2
            return logits.softmax(dim=1)

    return ProbabilityModel(model).eval()


def _example_batch(image_size: int):
    import torch

    # Batch 2, not 1: torch.export treats a dimension of size 1 as a constant.
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def _write_onnx(model, meta: ExportMetadata, out: Path) -> None:
    import torch

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > _ONNX_MAX_BYTES:
        raise ConfigError(
            f"{meta.arch} has {size / 2**30:.1f} GiB of weights, over ONNX's 2 GiB single-file limit; "
            "use --format torchscript"
        )
    example = _example_batch(meta.image_size)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.model.metadata_props.update(meta.to_onnx_props())
    program.model.doc_string = f"catdog-glm {meta.arch} cat/dog classifier: {', '.join(meta.classes)}"
    # Serialized in memory and written through write_atomic: one file, no external data, never half written.
    write_atomic(out, lambda f: f.write(program.model_proto.SerializeToString()))


def _write_torchscript(model, meta: ExportMetadata, out: Path) -> None:
    import torch

    example = _example_batch(meta.image_size)
    # torch flags torch.jit as deprecated in favour of torch.export; TorchScript is still what C++/LibTorch and
    # many servers load, and what this format promises, so the warnings would only be noise here.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, (example,))
        extra = {TORCHSCRIPT_METADATA_FILE: json.dumps(meta.to_dict())}
        write_atomic(out, lambda f: torch.jit.save(traced, f, _extra_files=extra))
