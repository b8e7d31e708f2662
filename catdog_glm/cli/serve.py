"""`catdog serve-classifier`: options -> serve.classifier.serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from catdog_glm.cli._common import ClassifierModelOption, PrecisionOption, console, user_errors


@user_errors
def serve_classifier(
    checkpoint: ClassifierModelOption = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the page to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    share: Annotated[
        bool, typer.Option("--share", help="Ask Gradio for a public share link (needs internet).")
    ] = False,
    root_path: Annotated[
        str, typer.Option(help="Public sub-path when served behind a reverse proxy, e.g. /cats.")
    ] = "",
    examples: Annotated[Path | None, typer.Option(help="Folder of example images shown under the upload box.")] = None,
    max_file_size: Annotated[str, typer.Option(help="Largest accepted upload, e.g. 10mb.")] = "10mb",
    max_batch_size: Annotated[int, typer.Option(help="Concurrent requests classified in one batch.")] = 16,
    queue_size: Annotated[int, typer.Option(help="Requests allowed to wait in the queue.")] = 64,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this.")] = 64_000_000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: PrecisionOption = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Serve a trained classifier as a Gradio page plus a JSON route (POST /api/classify).

    Example: catdog serve-classifier --checkpoint checkpoint/best.pt --examples ../shared/data/catdog/val
    """
    from catdog_glm.serve.classifier import model_markdown, serve
    from catdog_glm.vision.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)

    def ready(predictor, url: str, shared: bool) -> None:
        console.print(model_markdown(predictor.info()).replace("**", ""), highlight=False)
        console.print(f"Serving {path} at [bold]{url}[/]" + ("" if shared else f"  (JSON: POST {url}api/classify)"))
        console.print("Press Ctrl+C to stop.")

    serve(
        path,
        host=host,
        port=port,
        share=share,
        root_path=root_path.rstrip("/"),
        examples_dir=examples,
        max_file_size=max_file_size,
        max_batch_size=max_batch_size,
        queue_size=queue_size,
        device=device,
        precision=precision,
        max_pixels=max_pixels,
        on_ready=ready,
    )
