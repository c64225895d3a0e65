"""The playground page in a real browser (headless Debian Chromium, driven by Playwright) against a
served application of the trained portrait model (`portrait`, deployed beside the session's app
at /portrait): typing shows the optimized prompt; Ctrl+Enter generates, previews stream in, the
final image shows what was asked (read by the judge), and its copied Python code gives the same
image; an edit with an uploaded target and a painted mask keeps the unpainted pixels; a bad input
shows the API's message next to its control; /docs renders with no request leaving the machine
(/redoc, whose ReDoc bundle would fetch its logo from a CDN, is not served); the page fits a
phone's width; no console errors. Screenshots go to test-artifacts/playground/."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground"
PROMPT = "a woman with white hair, plain blue background"
RUN_TIMEOUT_MS = 180_000
BAD_REQUEST_LOG = "Failed to load resource: the server responded with a status of 400"

pytestmark = pytest.mark.slow


class Console:
    """The page's console errors and uncaught exceptions."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def unexpected(self, *expected: str) -> list[str]:
        return [error for error in self.errors if not any(text in error for text in expected)]


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 980})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.console = Console(page)
    try:
        yield page
    finally:
        context.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def data_url_image(source: str) -> Image.Image:
    header, _, payload = source.partition(",")
    assert header.startswith("data:image/png;base64"), header
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


def wait_until_done(page) -> None:
    page.wait_for_selector("#images[data-state=done]", timeout=RUN_TIMEOUT_MS)


def test_typing_shows_the_optimized_prompt_and_ctrl_enter_generates_what_was_asked(page, portrait_url, tmp_path):
    from deployments.models.portrait.judge import Judge

    page.goto(f"{portrait_url}/")
    page.fill("#prompt", PROMPT)
    optimized = page.locator("#optimized-prompt")
    optimized.wait_for()
    page.wait_for_function("document.querySelector('#optimized-prompt').textContent.includes('blue background')")
    assert "white hair" in optimized.text_content()
    assert page.locator("#attributes dt", has_text="background").count() == 1
    assert "as written" in page.text_content("#token-counts")

    page.fill("#seed", "11")
    # one preview after step 5 of 10; watch every src the image gets (the final one replaces it)
    page.fill("#steps", "10")
    page.fill("#partials", "1")
    page.evaluate(
        """() => {
            window.seenKinds = [];
            new MutationObserver(() => {
                const img = document.querySelector('#images figure img');
                if (img && img.dataset.kind !== 'pending') window.seenKinds.push(img.dataset.kind);
            }).observe(document.querySelector('#images'), {subtree: true, attributes: true, childList: true});
        }"""
    )
    page.press("#prompt", "Control+Enter")
    wait_until_done(page)
    kinds = page.evaluate("window.seenKinds")
    assert "partial" in kinds and kinds[-1] == "final", kinds
    assert kinds.index("partial") < kinds.index("final")
    assert page.get_attribute("#images", "data-partials") == "1"
    screenshot(page, "generate")

    final = data_url_image(page.get_attribute('#images img[data-kind="final"]', "src"))
    assert final.size == (128, 128)
    # The background is what the portrait model draws reliably today (99% on held-out prompts);
    # the rest of the prompt is the portrait-model issue's adherence figure.
    reading = Judge.packaged().read([final])[0]
    assert reading.values["background"] == "blue background", reading.values

    assert page.locator("#timing span[data-stage=denoise]").count() == 1  # the per-stage bar
    usage = page.text_content("#usage-list")
    assert "10 (explicit" in usage, usage  # the steps asked for, and why

    item = page.locator("#history li").first
    assert item.locator("img").count() == 1
    item.get_by_role("button", name="Copy Python").click()
    code = item.locator("pre.snippet").text_content()
    assert f'base_url="{portrait_url}/v1"' in code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = Image.open(tmp_path / "out.png").convert("RGB")
    assert np.array_equal(np.asarray(again), np.asarray(final))  # the copied code asks for the same picture
    item.get_by_role("button", name="Copy curl").click()
    assert f"curl -s {portrait_url}/v1/images/generations" in item.locator("pre.snippet").text_content()
    assert page.console.unexpected() == []


def test_an_edit_with_an_uploaded_target_and_a_painted_mask_keeps_what_was_not_painted(page, portrait_url, tmp_path):
    from deployments.models.portrait.attributes import PortraitAttributes
    from deployments.models.portrait.renderer import render_portrait

    target = render_portrait(PortraitAttributes(identity="woman", background="green background"), seed=5)
    target_path = tmp_path / "target.png"
    target.save(target_path)

    page.goto(f"{portrait_url}/")
    page.click("#tab-edit")
    assert page.is_visible("#edit-inputs")
    page.set_input_files("#target-file", str(target_path))
    page.wait_for_selector("#mask-editor.ready")
    assert page.input_value("#size") == "128x128"  # the target's size
    page.fill("#prompt", "wearing sunglasses")
    page.fill("#seed", "3")
    page.fill("#steps", "8")
    page.select_option("#sampler", "dpmpp_2m")
    page.fill("#cache-interval", "2")
    # the optimized prompt's panel opens above the canvas: paint once the layout has settled
    page.wait_for_function("document.querySelector('#optimized-prompt').textContent.includes('sunglasses')")
    box = page.locator("#mask-canvas").bounding_box()
    for row in (0.36, 0.42):  # a band over the eyes
        page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + row * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.7 * box["width"], box["y"] + row * box["height"], steps=8)
        page.mouse.up()
    page.click("#submit")
    wait_until_done(page)
    screenshot(page, "edit")

    edited = np.asarray(data_url_image(page.get_attribute('#images img[data-kind="final"]', "src"))).astype(int)
    original = np.asarray(target).astype(int)
    painted = page.evaluate(
        """() => {
            const c = document.querySelector('#mask-canvas');
            const alpha = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return Array.from({length: c.width * c.height}, (_, i) => alpha[4 * i + 3] > 0);
        }"""
    )
    painted = np.array(painted).reshape(original.shape[:2])
    assert 0.02 < painted.mean() < 0.4  # the strokes landed on the canvas, in image pixels
    near = sliding_window_view(np.pad(painted, 8), (17, 17)).any(axis=(2, 3))  # painted, or within 8 px
    far = ~near
    assert far.mean() > 0.4
    assert np.abs(edited - original)[far].max() == 0  # kept exactly where nothing was painted
    assert np.abs(edited - original)[painted].mean() > 2  # and redrawn where it was
    usage = page.text_content("#usage-list")
    assert "strength" in usage
    assert "dpmpp_2m, whole UNet every 2 step(s) (explicit)" in usage, usage  # the form's sampler fields went through
    assert page.console.unexpected() == []


def test_a_bad_input_shows_the_api_message_next_to_its_control(page, portrait_url):
    page.goto(f"{portrait_url}/")
    page.fill("#prompt", "a man")
    page.fill("#steps", "100000")
    page.click("#submit")
    message = page.locator('.field[data-param="num_inference_steps"] .field-error')
    message.wait_for()
    assert "between 1" in message.text_content()
    assert page.locator('.field[data-param="num_inference_steps"]').get_attribute("class") == "field invalid"
    assert page.is_hidden("#form-error")
    assert page.locator("#images figure").count() == 0  # no placeholder left behind
    page.fill("#steps", "")
    page.fill("#size", "100x37")
    page.click("#submit")
    page.wait_for_function(
        "document.querySelector('.field[data-param=size] .field-error').textContent.includes('100x37')"
    )
    assert page.text_content('.field[data-param="num_inference_steps"] .field-error') == ""  # cleared
    screenshot(page, "bad-input")
    assert page.console.unexpected(BAD_REQUEST_LOG) == []


def test_the_page_fits_a_phone(page, portrait_url):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{portrait_url}/")
    page.fill("#prompt", PROMPT)
    page.locator("#optimized-prompt").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#submit").bounding_box()["width"] > 0
    screenshot(page, "phone")
    assert page.console.unexpected() == []


def test_docs_render_with_no_request_leaving_the_machine(page, portrait_url):
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith("http://127.0.0.1"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{portrait_url}/docs")
    page.wait_for_selector(".swagger-ui .opblock")
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/prompts/optimize"} <= set(paths)
    screenshot(page, "docs")
    assert outside == []
    assert httpx.get(f"{portrait_url}/redoc").status_code == 404
    assert page.console.unexpected() == []
