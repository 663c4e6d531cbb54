"""The browser's side of the server: the playground page at `/`, the contract as JSON Schema
for it (`/schema/inputs`: every field's range and default, from the pydantic models), and API
docs that render with no network (`/docs`, `/redoc`; Swagger UI and ReDoc from the
fastapi-offline package instead of a CDN), with an OpenAPI schema that documents the Workers
AI request bodies too (they are read by hand, so FastAPI cannot see them).

The page is plain HTML, CSS and JavaScript in static/: no framework, no build step, nothing
fetched from anywhere but this server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from localgemma.contract import MessagesInputs, PromptInputs

STATIC = Path(__file__).resolve().parent / "static"


def _docs_assets() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    app.mount("/playground", StaticFiles(directory=STATIC), name="playground")
    app.mount("/docs-assets", StaticFiles(directory=_docs_assets()), name="docs-assets")
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/schema/inputs", inputs_schema, methods=["GET"], tags=["Operations"])
    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    app.openapi = lambda: openapi(app)


async def page():
    return FileResponse(STATIC / "index.html")


async def inputs_schema() -> dict[str, Any]:
    """The Workers AI contract's two input shapes as JSON Schema: fields, ranges, defaults."""
    return {"prompt": PromptInputs.model_json_schema(), "messages": MessagesInputs.model_json_schema()}


async def swagger():
    return get_swagger_ui_html(openapi_url="/openapi.json", title="localgemma API",
                               swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css",
                               swagger_favicon_url="/docs-assets/favicon.png")


async def redoc():
    return get_redoc_html(openapi_url="/openapi.json", title="localgemma API",
                          redoc_js_url="/docs-assets/redoc.standalone.js",
                          redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the request bodies the Workers AI routes read by hand."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from .workers_ai import FinetuneCreate

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    refs = {}
    for model in (PromptInputs, MessagesInputs, FinetuneCreate):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        refs[model] = {"$ref": f"#/components/schemas/{model.__name__}"}
    for path, methods in schema["paths"].items():
        if path.endswith("/ai/run/{model}") and "post" in methods:
            body = {"oneOf": [refs[PromptInputs], refs[MessagesInputs]]}
        elif path.endswith("/ai/finetunes") and "post" in methods:
            body = refs[FinetuneCreate]
        else:
            continue
        methods["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    app.openapi_schema = schema
    return schema
