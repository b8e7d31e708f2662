"""`catdog pull ID` and `catdog models`: chat models by name, downloaded once and listed, like ollama's."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from catdog_glm.cli._common import console, user_errors


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@user_errors
def pull(
    model: Annotated[
        str, typer.Argument(help="owner/name\\[@revision] (Hugging Face Hub) or modelscope:owner/name\\[@revision].")
    ],
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Also download the repository's .py files (for models that run custom code; never ChatGLM3).",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Download a chat model ahead of time (config, tokenizer, safetensors weights); later loads need no network.

    Example: catdog pull THUDM/chatglm3-6b
    """
    from catdog_glm.chat.hub import pull_model

    result = pull_model(model, trust_remote_code=trust_remote_code)
    state = "Pulled" if result.downloaded else "Kept the cached copy of"
    console.print(
        f"{state} {result.ref}: {result.files} files, {_size(result.bytes)}, in {result.seconds:.1f} s "
        f"-> {result.path}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"Chat with it:  catdog chat --model {result.ref}", highlight=False, soft_wrap=True)


@user_errors
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """List the chat models in the local caches (downloads and quantized conversions): id, source, size, folder.

    Example: catdog models --json
    """
    from rich.table import Table

    from catdog_glm.chat.hub import list_cached_models
    from catdog_glm.chat.model_cache import list_conversions

    cached = [m.to_dict() for m in list_cached_models()]
    for entry in list_conversions():  # quantized conversions that make the next --quantize load fast
        source = f"catdog int{entry['bits']} conversion"
        cached.append({"id": entry["id"], "source": source, "size": entry["bytes"], "path": entry["path"]})
    if as_json:
        typer.echo(json.dumps(cached, indent=2))
        return
    if not cached:
        console.print("No models cached yet. Download one with: catdog pull THUDM/chatglm3-6b", highlight=False)
        return
    table = Table("id", "source", "size", "path")
    table.columns[0].no_wrap = True
    table.columns[3].overflow = "fold"  # a path is worth more whole than on one line
    for m in cached:
        table.add_row(m["id"], m["source"], _size(m["size"]), m["path"])
    console.print(table)
