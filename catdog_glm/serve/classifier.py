"""`catdog serve-classifier`: the book's Gradio page, made solid, plus a plain JSON route for curl users.

One FastAPI app holds both: `POST /api/classify` (multipart field `file`), `GET /api/info`, `GET /health`, and
the Gradio page mounted at `/`. Both call the same predictor (PyTorch or ONNX Runtime), loaded once.
Only imported by the serve commands, so it may import FastAPI at module level.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# FastAPI resolves route annotations from this module's globals, so Request is imported here; the serve
# package itself is only imported inside the commands that need it.
from fastapi import FastAPI, Request

from catdog_glm.config import parse_size
from catdog_glm.errors import ConfigError
from catdog_glm.serve.net import DEFAULT_HOST, DEFAULT_PORT, require_free_port
from catdog_glm.vision.images import is_image_file, register_heif

if TYPE_CHECKING:
    from catdog_glm.vision.predictor import BasePredictor

log = logging.getLogger(__name__)

TITLE = "Cat vs Dog Classifier"
DEFAULT_MAX_FILE_SIZE = 10 * 1024 * 1024  # bytes, for the page and the JSON route alike
MAX_EXAMPLES = 24


def model_markdown(info: dict) -> str:
    acc = f"{info['val_acc']:.1%}" if isinstance(info.get("val_acc"), float) else "not recorded"
    return (
        f"**Model** {info['arch']} · **classes** {', '.join(info['classes'])} · **validation accuracy** {acc} · "
        f"**input** {info['image_size']}×{info['image_size']} · **device** {info['device']} ({info['precision']})"
    )


def find_examples(folder: str | Path | None, limit: int = MAX_EXAMPLES) -> list[str]:
    if not folder:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--examples {folder} is not a folder")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise ConfigError(f"--examples {folder} holds no images")
    return files[:limit]


def build_page(predictor: BasePredictor, *, examples: list[str], max_batch_size: int, queue_size: int):
    """The Gradio Blocks page: upload -> top-2 label, with model information and optional examples."""
    import gradio as gr

    def classify(paths: list[str | None]) -> tuple[list, list]:
        # batch=True: Gradio hands over up to max_batch_size concurrent requests at once.
        labels: list = [None] * len(paths)
        notes: list = ["Upload a photo, then press Submit."] * len(paths)
        given = [(i, p) for i, p in enumerate(paths) if p]
        if given:
            names = [Path(p).name for _, p in given]
            for (i, _), result in zip(given, predictor.predict_sources([p for _, p in given], names), strict=True):
                if result.ok:
                    labels[i] = result.probabilities
                    notes[i] = f"**{result.label}** ({result.probabilities[result.label]:.1%})"
                else:
                    notes[i] = f"⚠️ Could not classify this file: {result.error}"
        return labels, notes

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(300, 900)) as page:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(model_markdown(predictor.info()), elem_id="model-info")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"], height=320)
                with gr.Row():
                    clear = gr.ClearButton(value="Clear")
                    submit = gr.Button("Submit", variant="primary")
            with gr.Column():
                label = gr.Label(num_top_classes=2, label="Prediction")
                note = gr.Markdown(elem_id="status")
        # Gradio refuses a non-image upload inside its own preprocessing with a generic error; hand the file to
        # our decoder instead, which says what is wrong with it in the status line (as the JSON route does).
        strict_preprocess = image.preprocess

        def lenient_preprocess(payload):
            try:
                return strict_preprocess(payload)
            except Exception:
                return str(payload.path) if payload is not None and getattr(payload, "path", None) else None

        image.preprocess = lenient_preprocess
        clear.add([image, label, note])
        if examples:
            gr.Examples(examples=examples, inputs=image, label="Examples")
        submit.click(
            classify,
            inputs=image,
            outputs=[label, note],
            batch=True,
            max_batch_size=max_batch_size,
            api_name="classify",
            concurrency_limit=1,
        )
    page.queue(max_size=queue_size, default_concurrency_limit=1)
    return page


def create_app(
    predictor: BasePredictor,
    *,
    examples: list[str] | None = None,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    max_batch_size: int = 16,
    queue_size: int = 64,
    root_path: str = "",
) -> FastAPI:
    """FastAPI app with the JSON routes and the Gradio page mounted at `/`."""
    import gradio as gr
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    register_heif()  # Gradio opens uploads with Pillow before our code sees them: teach it HEIC first
    app = FastAPI(title=TITLE, docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.predictor = predictor

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/api/info")
    async def info():
        return predictor.info()

    @app.post("/api/classify")
    async def classify(request: Request):
        """Classify one image sent as multipart form field `file` (curl -F file=@cat.jpg ...)."""
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_file_size + 64 * 1024:  # refuse before reading a huge body
            return error(413, f"upload too large: the limit is {max_file_size:,} bytes")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # malformed multipart, wrong content type, too many parts
            return error(400, f"expected a multipart/form-data upload with the image in field 'file' ({e})")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return error(422, "no file in form field 'file': send it with curl -F file=@cat.jpg")
        data = await upload.read(max_file_size + 1)
        await form.close()
        if len(data) > max_file_size:
            return error(413, f"upload too large: the limit is {max_file_size:,} bytes")
        name = Path(upload.filename or "upload").name
        [result] = await run_in_threadpool(predictor.predict_sources, [data], [name])
        if not result.ok:
            return error(400, result.error)
        return {"label": result.label, "probabilities": result.probabilities}

    page = build_page(predictor, examples=examples or [], max_batch_size=max_batch_size, queue_size=queue_size)
    allowed = sorted({str(Path(p).parent) for p in examples or []})
    return gr.mount_gradio_app(
        app,
        page,
        path="/",
        max_file_size=max_file_size,
        show_error=True,
        root_path=root_path or None,
        allowed_paths=allowed,
        ssr_mode=False,
    )


def serve(
    checkpoint: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    root_path: str = "",
    examples_dir: str | Path | None = None,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    max_batch_size: int = 16,
    queue_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    max_pixels: int | None = None,
    on_ready=None,
) -> None:
    """Load the checkpoint (or exported .onnx model) once and serve the page and the API until interrupted."""
    from catdog_glm.vision.predictor import load_predictor

    limit = parse_size(max_file_size, option="--max-file-size")
    examples = find_examples(examples_dir)
    require_free_port(host, port)
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    predictor = load_predictor(checkpoint, device=device, precision=precision, **kwargs)
    # Gradio's uploads go to a temp folder of our own, removed at exit, so a long-running server
    # does not fill the disk (delete_cache trims it while running). Made after loading, so a model that
    # fails to load leaves nothing behind.
    temp_dir = tempfile.mkdtemp(prefix="catdog-gradio-")
    os.environ.setdefault("GRADIO_TEMP_DIR", temp_dir)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        if share:
            page = build_page(predictor, examples=examples, max_batch_size=max_batch_size, queue_size=queue_size)
            if on_ready:
                on_ready(predictor, f"http://{host}:{port}/", shared=True)
            page.launch(server_name=host, server_port=port, share=True, max_file_size=limit, show_error=True)
            return
        import uvicorn

        app = create_app(
            predictor,
            examples=examples,
            max_file_size=limit,
            max_batch_size=max_batch_size,
            queue_size=queue_size,
            root_path=root_path,
        )
        if on_ready:
            on_ready(predictor, f"http://{host}:{port}{root_path}/", shared=False)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
