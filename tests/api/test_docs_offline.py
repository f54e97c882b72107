"""What a newcomer meets at the API's port: the docs pages work with no network (every asset
the page loads is served by the app itself), and a bad request names the field it is about."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from tests.api.conftest import Factory, LogTrap, bearer, make_keys


class _Assets(HTMLParser):
    """Every URL a page loads: script src, link href, img src, and the spec's url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


async def test_docs_load_only_assets_the_app_serves(serve: Factory) -> None:
    api = await serve()
    page = await api.http.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    parser = _Assets()
    parser.feed(page.text)
    spec = re.findall(r"url: '([^']+)'", page.text)
    assert spec == ["/openapi.json"]
    urls = parser.urls + spec
    assert len(parser.urls) >= 3, page.text  # the script, the stylesheet, the icon
    for url in urls:
        assert url.startswith("/"), f"{url} is not served by the app (a CDN?)"
        asset = await api.http.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "swagger-ui-bundle.js" in " ".join(urls) and "swagger-ui.css" in " ".join(urls)
    assert "cdn" not in page.text.lower() and "https://" not in page.text


async def test_redoc_is_not_a_404(serve: Factory) -> None:
    api = await serve()
    redoc = await api.http.get("/redoc", follow_redirects=False)
    assert redoc.status_code == 307 and redoc.headers["location"] == "/docs"
    assert (await api.http.get("/redoc", follow_redirects=True)).status_code == 200


async def test_a_bad_admin_body_names_the_field(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    admin = bearer(make_keys(api, log_trap).admin["prod"])
    wrong_type = await api.http.post(
        "/v1/admin/rotate/prod/alpha", headers=admin, json={"if_version": 5}
    )
    assert wrong_type.status_code == 422
    error = wrong_type.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"] == "body.if_version: Input should be a valid string"
    missing = await api.http.post("/v1/admin/revoke/prod", headers=admin, json={"all": True})
    assert missing.json()["error"]["message"] == "body.reason: Field required"
    listed = await api.http.post(
        "/v1/admin/revoke/prod", headers=admin, json={"reason": "x", "credentials": ["ok", 7]}
    )
    message = listed.json()["error"]["message"]
    assert message == "body.credentials[1]: Input should be a valid string"
    no_body = await api.http.post("/v1/admin/revoke/prod", headers=admin)
    assert no_body.status_code == 422
    message = no_body.json()["error"]["message"]
    assert message.startswith("body: required") and "JSON object" in message
    assert "request:" not in message
