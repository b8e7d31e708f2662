"""`catdog export chat|classifier`: our models in formats other engines serve (vLLM/SGLang, ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from catdog_glm.cli._common import console, err_console, legacy_precision, user_errors
from catdog_glm.config import check_precision

app = typer.Typer(
    help="Export models for other engines: ChatGLM3 as a plain transformers folder, the classifier as ONNX.",
    no_args_is_help=True,
)


EXPORT_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _export_precision(precision: str, dtype: str | None) -> str:
    """The weight dtype name of a chat export from --precision (auto: bf16) or the deprecated --dtype."""
    value = legacy_precision(precision, dtype=dtype)
    option = "--precision" if dtype is None else "--dtype"
    check_precision(value, EXPORT_PRECISIONS, "an export", "it writes the weights in one dtype", option)
    return "bf16" if value == "auto" else value


@app.command("chat")
@user_errors
def export_chat(
    model: Annotated[
        str,
        typer.Option(
            help="A ChatGLM3 folder in the official layout (config.json, tokenizer.model), or its id: "
            "owner/name\\[@revision] or modelscope:owner/name\\[@revision] (downloaded once, then cached)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to write; it must not exist yet (or pass --overwrite).")],
    precision: Annotated[
        str, typer.Option(help="Weight dtype of the export: auto (bf16), bf16, fp16 or fp32.")
    ] = "auto",
    dtype: Annotated[str | None, typer.Option("--dtype", hidden=True, help="Deprecated: --precision.")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 2GB or 500MB.")] = "2GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Write ChatGLM3 as a standard transformers folder (GlmForCausalLM, tokenizer.json, chat template).

    Example: catdog export chat --model chatglm3-6b --out chatglm3-6b-hf
    """
    from catdog_glm.chat.export import export_chatglm3
    from catdog_glm.chat.hub import resolve_model

    weights = _export_precision(precision, dtype)

    folder = Path(resolve_model(model))  # a hub id -> its cached (or downloaded) folder
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("exporting shards", total=None)
        result = export_chatglm3(
            folder,
            out,
            dtype=weights,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            on_shard=lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(
        f"Wrote {result.path}: {result.parameters / 1e6:,.1f}M parameters in {result.shards} {result.dtype} "
        f"shard(s), {result.bytes / 2**20:,.1f} MiB, in {result.seconds:.1f} s.",
        highlight=False,
    )
    console.print(f"Check it:  catdog chat --model {result.path}", highlight=False)


@app.command("classifier")
@user_errors
def export_classifier(
    out: Annotated[Path, typer.Option(help="File to write, e.g. catdog.onnx.")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint file or run folder (default: the best checkpoint under checkpoint/)."),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Export the classifier as ONNX (or TorchScript) with its preprocessing and classes in the metadata.

    Example: catdog export classifier --checkpoint checkpoint/best.pt --out catdog.onnx
    """
    from catdog_glm.vision.checkpoint import resolve_checkpoint
    from catdog_glm.vision.export import export_classifier as export

    path = resolve_checkpoint(checkpoint)
    with console.status(f"exporting {path} as {format}"):
        result = export(path, out, fmt=format, overwrite=overwrite)
    console.print(
        f"Wrote {result.path} ({result.format}, {result.bytes / 2**20:,.1f} MiB, classes {', '.join(result.classes)}, "
        f"{result.image_size}px input) in {result.seconds:.1f} s.",
        highlight=False,
    )
    if result.format == "onnx":
        console.print(f"Check it:  catdog predict --model {result.path} IMAGE", highlight=False)
