"""The playground page and the offline docs as the ingress serves them (no browser: the page's
behaviour is tested in Chromium by tests/integration/test_playground_browser.py)."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from serve_app.config import AppSettings, Limits
from serve_app.http import playground, routes
from tests.unit.test_http_schemas import StandInPipeline


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(routes, "_serving", routes.ServingState())
    settings = AppSettings(default_size="128x128", limits=Limits(max_images=3, max_steps=60))
    routes.install(StandInPipeline(), settings, "stand-in", {"image_prompt_adapter": True})  # type: ignore[arg-type]
    return TestClient(routes.app)


def embedded_config(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="server-config">(.*?)</script>', page, re.S)
    assert found, "the page embeds no config"
    return json.loads(found.group(1))


def test_the_page_embeds_the_servers_limits_and_defaults(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<base href="/">' in page.text
    config = embedded_config(page.text)
    assert config == {
        **config,
        "model": "stand-in",
        "api_keys": False,
        "default_size": "128x128",
        "max_images": 3,
        "max_steps": 60,
        "reference_image": True,
        "quality_tiers": ["fast", "balanced", "best"],
    }
    assert "{{" not in page.text  # every placeholder filled


def test_under_a_route_prefix_the_pages_paths_resolve_to_that_application(client):
    prefixed = TestClient(routes.app, root_path="/portrait")
    assert '<base href="/portrait/">' in prefixed.get("/").text
    docs = prefixed.get("/docs").text
    assert "/portrait/openapi.json" in docs and "/portrait/docs-assets/swagger-ui-bundle.js" in docs


def test_the_config_cannot_end_the_script_element_early():
    config = playground.PlaygroundConfig(
        model='</script><script>alert("x")</script>',
        api_keys=False,
        default_size="64x64",
        min_side=64,
        max_side=512,
        max_images=4,
        max_steps=50,
        default_guidance_scale=7.5,
        reference_image=False,
        version="0",
    )
    page = playground.render_page('/a"b', config)
    assert "<script>alert" not in page
    assert embedded_config(page)["model"] == config.model  # the same text, escaped for JSON only
    assert '<base href="/a&quot;b/">' in page


def test_the_pages_assets_are_served_and_nothing_else_of_the_package(client):
    script = client.get("/playground/playground.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/playground/playground.css").status_code == 200
    assert client.get("/playground/__init__.py").status_code == 404
    assert client.get("/playground/../routes.py").status_code == 404


def test_docs_load_swagger_ui_from_the_app_not_a_cdn(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(not url.startswith(("http:", "https:", "//")) for url in assets), assets
    for url in assets:
        assert client.get(url).status_code == 200, url
    assert client.get("/redoc").status_code == 404  # ReDoc's bundle fetches its logo from a CDN: not served
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/images/generations", "/v1/images/edits"}
