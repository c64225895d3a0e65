"""One real Ray + Serve instance per test session, serving the app from serve_config.yaml
on the embedded model, reached over real HTTP."""

from __future__ import annotations

import os
import time

import httpx
import pytest

# Debian's chromium (`make browser` installs it); Playwright's own browser download cannot work here.
CHROMIUM = os.environ.get("FUSIONSERVE_CHROMIUM", "/usr/bin/chromium")
# Headless as root, and no calls home: this machine's network refuses them, noisily.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PORT = int(os.environ.get("FUSIONSERVE_TEST_PORT", "8123"))


def wait_until_healthy(url: str, timeout_s: float) -> None:
    """Poll the application's /healthz until it answers 200 (fails the test after timeout_s)."""
    deadline = time.time() + timeout_s
    while httpx.get(f"{url}/healthz", timeout=5).status_code != 200:
        assert time.time() < deadline, f"{url} did not become healthy in {timeout_s:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def serve_settings(tiny_model_path):
    from serve_app.ops.cli import load_serve_config, split_app_config

    settings, deployment_options, _ = split_app_config(load_serve_config("serve_config.yaml"), model="tiny")
    return settings, deployment_options


@pytest.fixture(scope="session")
def base_url(serve_settings):
    import ray
    from ray import serve

    from serve_app.app import build_application

    settings, deployment_options = serve_settings
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT}, proxy_location="HeadOnly")
        serve.run(build_application(settings, deployment_options), name="fusionserve", route_prefix="/")
        url = f"http://127.0.0.1:{PORT}"
        wait_until_healthy(url, timeout_s=60)
        yield url
    finally:
        ray.shutdown()  # our own Ray instance: stops Serve too, without its ~30 s graceful drain


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def metric_lines(prefix: str, label: str = "", timeout_s: float = 40.0) -> tuple[list[str], str]:
    """Lines of Ray's metrics endpoint starting with `prefix` (and containing `label`),
    polled until some appear: custom metrics are exported every few seconds. Returns the
    lines (possibly none, after the timeout) and the whole text of the last scrape."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.time() + timeout_s
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith(prefix) and label in line]
        if lines or time.time() > deadline:
            return lines, text
        time.sleep(2)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Playwright, per test module: while Playwright's sync API
    runs, this thread has a running event loop, and other modules' asyncio.run() would fail."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no browser at {CHROMIUM}: `make browser` installs Debian's chromium (or FUSIONSERVE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


PORTRAIT_STAGES = ("Ingress", "PromptOptimizer", "TextEncoder", "Denoiser", "VaeCodec")


@pytest.fixture(scope="session")
def portrait_url(base_url):
    """The portrait model served as a second application at /portrait, with small CPU shares
    (the playground's browser tests and the face-fusion tests share it)."""
    from ray import serve

    from serve_app.app import build_application
    from serve_app.ops.cli import load_serve_config, split_app_config

    settings, _, _ = split_app_config(load_serve_config("serve_config.yaml"), model="portrait")
    small = {name: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.01}} for name in PORTRAIT_STAGES}
    serve.run(build_application(settings, small), name="portrait", route_prefix="/portrait")
    url = f"{base_url}/portrait"
    wait_until_healthy(url, timeout_s=120)
    try:
        yield url
    finally:
        serve.delete("portrait")
