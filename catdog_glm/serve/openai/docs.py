"""/docs offline: Swagger UI from the swagger-ui-bundle wheel (no CDN), fed the schema written down to OpenAPI 3.0;
FastAPI's 422 (answered 400 here, in OpenAI's shape) dropped from the schema."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

DOCS_ASSETS = "/docs-assets"


def mount_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle wheel (FastAPI's self-hosting recipe), so /docs works offline.
    The wheel's Swagger UI (4.15) reads OpenAPI 3.0 only, so the page loads the schema written down to 3.0;
    /openapi.json stays FastAPI's 3.1 for tools."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs/openapi-3.0.json", include_in_schema=False)
    async def openapi_30():
        return JSONResponse(_as_openapi_30(app.openapi()))

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url="/docs/openapi-3.0.json",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def openapi_without_422(app: FastAPI) -> None:
    """Validation errors are answered 400 in OpenAI's shape (ErrorResponse): drop FastAPI's 422 from the schema."""
    build = app.openapi

    def openapi() -> dict:
        doc = build()
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        return doc

    app.openapi = openapi


def _as_openapi_30(doc: dict) -> dict:
    """FastAPI's OpenAPI 3.1 -> 3.0 for Swagger UI 4: `anyOf [X, null]` -> X + nullable, `const` -> enum,
    `examples` -> example."""

    def down(node):
        if isinstance(node, list):
            return [down(x) for x in node]
        if not isinstance(node, dict):
            return node
        node = {k: down(v) for k, v in node.items()}
        if "anyOf" in node:
            kept = [x for x in node["anyOf"] if x != {"type": "null"}]
            if len(kept) < len(node["anyOf"]):
                node["nullable"] = True
                if len(kept) == 1:
                    del node["anyOf"]
                    inner = kept[0]
                    node = {**inner, **node} if "$ref" not in inner else {"allOf": [inner], **node}
                else:
                    node["anyOf"] = kept
        if "const" in node:
            node["enum"] = [node.pop("const")]
        if isinstance(node.get("examples"), list) and "schema" not in node:
            examples = node.pop("examples")
            if examples:
                node["example"] = examples[0]
        return node

    out = down({k: v for k, v in doc.items() if k != "openapi"})
    return {"openapi": "3.0.3", **out}
