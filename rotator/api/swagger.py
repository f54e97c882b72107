"""The API's own documentation pages, served offline: Swagger UI at ``/docs`` from the assets
the ``swagger-ui-bundle`` package ships (no CDN: the page works in an air-gapped cluster), the
OpenAPI document at ``/openapi.json``, and ``/redoc`` sending the reader to ``/docs`` (ReDoc
ships no offline bundle on PyPI)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.requests import Request
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/docs/assets"
"""Where the Swagger UI files are served: every URL the page loads is under it."""


def install(app: FastAPI) -> None:
    """Serve the pages on ``app`` (which must be made with ``docs_url=None, redoc_url=None``)."""
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="swagger-ui-assets")
    oauth2_redirect = "/docs/oauth2-redirect"

    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=oauth2_redirect,
        )

    async def redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> RedirectResponse:
        return RedirectResponse("/docs", status_code=307)

    app.add_api_route("/docs", docs, include_in_schema=False, methods=["GET"])
    app.add_api_route(oauth2_redirect, redirect, include_in_schema=False, methods=["GET"])
    app.add_api_route("/redoc", redoc, include_in_schema=False, methods=["GET"])
