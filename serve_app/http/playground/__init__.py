"""The playground page at `/` and the API docs' assets, both served by the ingress itself.

The page is plain HTML, CSS and ES-module JavaScript shipped as package data: nothing to build
and no front-end dependency. The server fills in two things when it serves `index.html`: a
`<base href>` (under a route prefix such as `/portrait` the page's relative API paths resolve
to that application) and the `PlaygroundConfig` as JSON (limits, defaults, whether keys are on).
Swagger UI loads its JavaScript and CSS from the pinned `fastapi-offline` package instead of a
CDN, so /docs works on a machine without internet.
"""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

PAGE_DIR = Path(str(resources.files(__name__) / "static"))
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
PAGE_ASSETS = "/playground"  # the page's script and style sheet
DOCS_ASSETS = "/docs-assets"  # Swagger UI's
OPEN_PREFIXES = (PAGE_ASSETS + "/", DOCS_ASSETS + "/")  # static files: no API key asked
OPEN_PAGES = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
QUALITY_TIERS = ("fast", "balanced", "best")


class PlaygroundConfig(BaseModel):
    """What the page needs to know about this server, embedded in the page it serves."""

    model: str
    api_keys: bool = Field(description="true: every /v1 request needs `Authorization: Bearer KEY`")
    default_size: str
    min_side: int
    max_side: int
    max_images: int
    max_steps: int
    default_guidance_scale: float
    quality_tiers: tuple[str, ...] = QUALITY_TIERS
    reference_image: bool = Field(description="the model has an image-prompt adapter: edits take a source face")
    version: str


def render_page(root_path: str, config: PlaygroundConfig) -> str:
    """index.html with its base URL and the server's config filled in."""
    page = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
    # In a <script> element only "</" can end it early; "\u003c" is the same character to JSON.
    config_json = config.model_dump_json().replace("<", "\\u003c")
    base = html.escape(root_path.rstrip("/") + "/", quote=True)
    return page.replace("{{BASE_HREF}}", base).replace("{{CONFIG_JSON}}", config_json)


def mount_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) from the app's own assets. `app` is made with docs_url=None and
    redoc_url=None so that FastAPI's CDN-loading pages are not registered. No /redoc: ReDoc's
    bundle loads its logo from cdn.redoc.ly whatever its options (seen in the browser test)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def mount_page_assets(app: FastAPI) -> None:
    app.mount(PAGE_ASSETS, StaticFiles(directory=PAGE_DIR), name="playground")
