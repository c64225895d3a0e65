"""The fields of the current OpenAI Images API, without Ray or a model: quality names mapped onto
our tiers, output formats, size "auto", what is refused (transparent background, compression
for PNG, unknown fields), streamed answers as server-sent events, and the OpenAI fields of the
answer. A stand-in pipeline records the request it gets and answers real PNGs."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.config import AppSettings, StepSettings
from serve_app.flow.pipeline import GenerationResult
from serve_app.flow.request import ImageRequest
from serve_app.http import routes
from serve_app.http.image_output import ImageOutput, encode_image
from tests.conftest import png_bytes
from tests.unit.test_http_schemas import StandInPipeline

DEFAULT_SIZE = "96x64"  # what build_app makes of the model's native size


def detailed_png(width: int, height: int, seed: int = 0) -> bytes:
    """A picture with edges and noise, so lossy encoders have something to lose."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x ^ y) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return png_bytes(Image.fromarray(noisy))


class RecordingPipeline(StandInPipeline):
    """The stand-in's answer with real PNGs of the asked size; keeps the last request."""

    def __init__(self):
        self.requests: list[ImageRequest] = []

    async def generate(self, request: ImageRequest) -> GenerationResult:
        self.requests.append(request)
        result = await super().generate(request)
        result.images_png = [detailed_png(request.width, request.height, seed) for seed in request.seeds]
        return result


def serve(monkeypatch, settings: AppSettings) -> tuple[TestClient, RecordingPipeline]:
    pipeline = RecordingPipeline()
    monkeypatch.setattr(routes, "_serving", routes.ServingState())
    routes.install(pipeline, settings, "stand-in")  # type: ignore[arg-type]
    return TestClient(routes.app), pipeline


@pytest.fixture
def served(monkeypatch):
    return serve(monkeypatch, AppSettings(default_size=DEFAULT_SIZE))


def generate(client: TestClient, **fields):
    return client.post("/v1/images/generations", json={"prompt": "a man", "seed": 3, **fields})


def edit(client: TestClient, image: bytes | None = None, **fields):
    files = {"image": ("b.png", image or detailed_png(80, 64))}
    return client.post("/v1/images/edits", files=files, data={"prompt": "smiling", **fields})


def decoded(body: dict, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(body["data"][index]["b64_json"])))


def assert_refused(response, param: str, fragment: str, code: str | None = None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert fragment in error["message"], error["message"]
    if code is not None:
        assert error["code"] == code


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize(
    "quality,tier,answered",
    [
        ("low", "fast", "low"),
        ("medium", "balanced", "medium"),
        ("high", "best", "high"),
        ("standard", "balanced", "medium"),
        ("hd", "best", "high"),
        ("fast", "fast", "low"),
        ("balanced", "balanced", "medium"),
        ("best", "best", "high"),
    ],
)
def test_quality_names_are_aliases_of_the_tiers(served, quality, tier, answered):
    client, pipeline = served
    response = generate(client, quality=quality)
    assert response.status_code == 200, response.text
    assert pipeline.requests[-1].quality == tier
    assert response.json()["quality"] == answered


def test_quality_auto_is_the_configured_default_tier(monkeypatch):
    settings = AppSettings(default_size=DEFAULT_SIZE, steps=StepSettings(default_quality="best"))
    client, pipeline = serve(monkeypatch, settings)
    for fields in ({"quality": "auto"}, {}):
        response = generate(client, **fields)
        assert response.status_code == 200, response.text
        assert pipeline.requests[-1].quality is None  # the step controller's default: steps.default_quality
        assert response.json()["quality"] == "high"


def test_edits_map_quality_too(served):
    client, pipeline = served
    response = edit(client, quality="low")
    assert response.status_code == 200, response.text
    assert (pipeline.requests[-1].quality, response.json()["quality"]) == ("fast", "low")


# --------------------------------------------------------------------------- output formats


@pytest.mark.parametrize("output_format,pillow", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats_decode_as_that_format(output_format, pillow):
    png = detailed_png(96, 64)
    encoded = encode_image(png, ImageOutput(output_format, 80))
    with Image.open(io.BytesIO(encoded)) as image:
        assert (image.format, image.size, image.mode) == (pillow, (96, 64), "RGB")
        error = np.abs(np.asarray(image, dtype=int) - np.asarray(Image.open(io.BytesIO(png)), dtype=int)).mean()
    assert error < 20  # the same picture, within lossy-compression error


def test_png_stays_the_pipelines_bytes():
    png = detailed_png(64, 64)
    assert encode_image(png, ImageOutput("png")) is png


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_compression_trades_bytes_for_quality(output_format):
    png = detailed_png(128, 128)
    sizes = [len(encode_image(png, ImageOutput(output_format, level))) for level in (10, 50, 100)]
    assert sizes[0] < sizes[1] < sizes[2], sizes


@pytest.mark.parametrize("output_format,pillow", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_the_answer_is_encoded_in_the_asked_format(served, output_format, pillow):
    client, _ = served
    response = generate(client, output_format=output_format, n=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output_format"] == output_format
    assert [decoded(body, i).format for i in range(2)] == [pillow, pillow]
    assert ("transcode" in response.headers["server-timing"]) == (output_format != "png")


def test_png_answer_is_byte_identical_to_the_pipelines(served):
    client, _ = served
    for fields in ({}, {"output_format": "png"}):
        body = generate(client, size="64x64", **fields).json()
        assert base64.b64decode(body["data"][0]["b64_json"]) == detailed_png(64, 64, seed=3)
        assert body["output_format"] == "png"


def test_jpeg_compression_reaches_the_encoder(served):
    client, _ = served
    sizes = [
        len(
            base64.b64decode(
                generate(client, output_format="jpeg", output_compression=level).json()["data"][0]["b64_json"]
            )
        )
        for level in (5, 95)
    ]
    assert sizes[0] < sizes[1]


def test_edits_answer_in_the_asked_format(served):
    client, _ = served
    response = edit(client, output_format="webp", output_compression="40")  # form fields are text
    assert response.status_code == 200, response.text
    assert (response.json()["output_format"], decoded(response.json()).format) == ("webp", "WEBP")


def test_compression_for_png_is_refused(served):
    client, _ = served
    assert_refused(generate(client, output_compression=50), "output_compression", "jpeg and webp only")
    assert_refused(generate(client, output_format="png", output_compression=100), "output_compression", "lossless")
    assert_refused(edit(client, output_compression="50"), "output_compression", "jpeg and webp only")


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"output_format": "jpeg", "output_compression": -1}, "output_compression"),
        ({"output_format": "jpeg", "output_compression": "50"}, "output_compression"),  # JSON is strict
    ],
)
def test_bad_output_fields_are_refused(served, fields, param):
    client, _ = served
    assert_refused(generate(client, **fields), param, "")


# --------------------------------------------------------------------------- size "auto"


def test_size_auto_is_the_models_native_size(served):
    client, pipeline = served
    body = generate(client, size="auto").json()
    assert (pipeline.requests[-1].width, pipeline.requests[-1].height) == (96, 64)
    assert body["size"] == DEFAULT_SIZE
    assert decoded(body).size == (96, 64)


def test_size_auto_for_an_edit_is_the_targets(served):
    client, pipeline = served
    response = edit(client, detailed_png(72, 88), size="auto")
    assert response.status_code == 200, response.text
    assert (pipeline.requests[-1].width, pipeline.requests[-1].height) == (72, 88)
    assert response.json()["size"] == "72x88"


# --------------------------------------------------------------------------- background, streaming, the rest


def test_transparent_background_is_refused_with_the_reason(served):
    client, pipeline = served
    assert_refused(generate(client, background="transparent"), "background", "opaque images only")
    assert_refused(edit(client, background="transparent"), "background", "opaque images only")
    assert pipeline.requests == []  # refused before the pipeline
    for background in ("auto", "opaque"):
        response = generate(client, background=background)
        assert (response.status_code, response.json()["background"]) == (200, "opaque")


def sse_events(response) -> list[tuple[str, dict]]:
    """(event name, data) of a text/event-stream answer, in order."""
    import json

    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_a_stream_sends_partial_images_then_a_completed_event_per_image(served):
    client, pipeline = served
    response = generate(client, stream=True, partial_images=2, n=2, output_format="jpeg", output_compression=50)
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert [(name, data["type"], data.get("partial_image_index"), data["image_index"]) for name, data in events] == [
        ("image_generation.partial_image", "image_generation.partial_image", 0, 0),
        ("image_generation.partial_image", "image_generation.partial_image", 0, 1),
        ("image_generation.partial_image", "image_generation.partial_image", 1, 0),
        ("image_generation.partial_image", "image_generation.partial_image", 1, 1),
        ("image_generation.completed", "image_generation.completed", None, 0),
        ("image_generation.completed", "image_generation.completed", None, 1),
    ]
    for _, data in events:
        assert (data["output_format"], data["size"], data["background"]) == ("jpeg", DEFAULT_SIZE, "opaque")
        assert Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))).format == "JPEG"
    completed = events[-1][1]
    assert completed["usage"]["num_inference_steps"] == 12 and completed["seed"] == 4
    assert [data["steps_done"] for _, data in events[:4:2]] == [3, 6]
    edit_events = sse_events(edit(client, stream="true"))  # partial_images left out: 0
    assert [name for name, _ in edit_events] == ["image_edit.completed"]


def test_a_failure_after_the_stream_began_is_an_error_event(served):
    client, pipeline = served
    pipeline.fail_after_start = RuntimeError("the denoiser replica died")
    events = sse_events(generate(client, stream=True, partial_images=2))
    assert events == [
        (
            "error",
            {
                "type": "error",
                "error": {
                    "message": "internal error: RuntimeError",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                },
            },
        )
    ]


def test_partial_images_are_checked_and_ignored_without_streaming(served):
    client, pipeline = served
    for response in (generate(client, stream=False, partial_images=3), edit(client, stream="false")):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
    assert_refused(generate(client, partial_images=4), "partial_images", "less than or equal to 3")


@pytest.mark.parametrize(
    "fields",
    [
        {"moderation": "auto"},
        {"moderation": "low"},
        {"style": "vivid"},
        {"style": "natural"},
        {"user": "someone"},
        {"safety_identifier": "hashed-user"},
        {"response_format": "b64_json", "model": "anything"},
    ],
)
def test_accepted_openai_fields(served, fields):
    client, _ = served
    assert generate(client, **fields).status_code == 200


def test_edit_only_and_generation_only_fields_stay_where_openai_has_them(served):
    client, _ = served
    for fidelity in ("high", "low"):
        assert edit(client, input_fidelity=fidelity).status_code == 200
    assert_refused(generate(client, input_fidelity="high"), "input_fidelity", "unknown parameter")
    assert_refused(edit(client, moderation="low"), "moderation", "unknown parameter")
    assert_refused(generate(client, moderation="strict"), "moderation", "")
    assert_refused(generate(client, colour="red"), "colour", "unknown parameter", code="unknown_parameter")


def test_the_official_client_sends_every_field(served):
    """The `openai` client itself (over the ASGI app, no network): what a new user types."""
    http, pipeline = served
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    response = client.images.generate(
        prompt="a man",
        quality="low",
        output_format="jpeg",
        output_compression=60,
        size="auto",
        background="auto",
        moderation="low",
        style="natural",
        user="u",
        n=1,
        stream=False,
    )
    assert (response.output_format, response.quality, response.size, response.background) == (
        "jpeg",
        "low",
        DEFAULT_SIZE,
        "opaque",
    )
    assert Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json or ""))).format == "JPEG"
    assert pipeline.requests[-1].quality == "fast"
