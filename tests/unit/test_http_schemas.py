"""The HTTP layer without Ray or a model: /docs shows response schemas, and the answers have
the documented shape (a stand-in pipeline returns a fixed result)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import torch
from fastapi.testclient import TestClient

from deployments.prompt.optimizer import OptimizedPrompt
from serve_app.config import AppSettings
from serve_app.flow.pipeline import DenoiseStarted, GenerationResult, PartialImages, StreamEvent
from serve_app.flow.request import ImageRequest
from serve_app.flow.steps import StepDecision
from serve_app.flow.usage import usage_of
from serve_app.http import routes

PROMPT = OptimizedPrompt(
    "Asian man, smiling expression",
    "blurry",
    prompt_tokens=5,
    negative_prompt_tokens=1,
    truncated_tokens=0,
    cache_namespace="default",
    original_tokens=7,
    attributes={"identity": ["Asian man"], "expression": ["smiling expression"], "accessories": ["hat", "scarf"]},
    warnings=("dropped 'highly detailed'",),
)

# The README's API section: the top-level keys and the `usage` keys, in the order they are sent.
IMAGES_KEYS = ["created", "background", "data", "output_format", "quality", "size", "usage", "warnings"]
USAGE_KEYS = [
    "input_tokens",
    "input_tokens_details",
    "output_tokens",
    "total_tokens",
    "original_input_tokens",
    "prefix_tokens",
    "template_tokens",
    "negative_prompt_tokens",
    "truncated_tokens",
    "num_inference_steps",
    "steps_reason",
    "steps_policy",
    "scheduler",
    "cache_interval",
    "cache_branch_id",
    "sampler_reason",
    "steps_complexity",
    "deadline_ms",
    "deadline_met",
    "predicted_ms",
    "elapsed_ms",
    "denoising_steps",
    "strength",
    "reference_image_cached",
]
OPTIMIZE_KEYS = [
    "prompt",
    "negative_prompt",
    "attributes",
    "original_tokens",
    "optimized_tokens",
    "template_tokens",
    "saved_fraction",
    "prefix_tokens",
    "cache_namespace",
    "warnings",
]


class StandInPipeline:
    """Answers like an ImagePipeline, without stages."""

    async def generate(self, request: ImageRequest) -> GenerationResult:
        from deployments.denoiser.engine import DenoiseJob
        from deployments.text_encoder.engine import Encoding

        steps = StepDecision(12, "slo", "slo", 0.25, deadline_ms=30000.0, predicted_ms=420.0)
        job = DenoiseJob(torch.zeros(1), torch.zeros(1), request.height, request.width, request.seeds, 12, 7.5)
        usage = usage_of(PROMPT, steps, Encoding(torch.zeros(2), [16, 77]), 512.345, job)
        pngs = [b"png %d" % seed for seed in request.seeds]
        return GenerationResult(pngs, request.seeds, PROMPT, steps, usage, {"optimize": 1.0, "denoise": 2.5})

    async def generate_stream(self, request: ImageRequest, partial_images: int = 0) -> AsyncIterator[StreamEvent]:
        """`partial_images` previews (the final images themselves), then the result; with
        `fail_after_start` set, the error instead of anything after DenoiseStarted."""
        result = await self.generate(request)
        yield DenoiseStarted(result.steps)
        if self.fail_after_start is not None:
            raise self.fail_after_start
        for index in range(partial_images):
            yield PartialImages(index, result.images_png, 3 * (index + 1), 12)
        yield result

    fail_after_start: Exception | None = None

    async def optimize_prompt(self, prompt: str, negative_prompt: str = "", cache_namespace: str = "default"):
        return PROMPT


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(routes, "_serving", routes.ServingState())
    routes.install(StandInPipeline(), AppSettings(), "stand-in")  # type: ignore[arg-type]
    return TestClient(routes.app)


def _schema_of(openapi: dict, path: str) -> dict:
    return openapi["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]


def _component(openapi: dict, ref: dict) -> dict:
    return openapi["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]


def test_openapi_shows_the_response_schemas():
    openapi = routes.app.openapi()
    for path in ("/v1/images/generations", "/v1/images/edits"):
        images = _component(openapi, _schema_of(openapi, path))
        assert list(images["properties"]) == IMAGES_KEYS, path
        assert list(_component(openapi, images["properties"]["usage"])["properties"]) == USAGE_KEYS
        errors = openapi["paths"][path]["post"]["responses"]
        assert set(errors) == {"200", "4XX", "5XX"}  # no 422: validation errors are 400s
        assert _component(openapi, errors["4XX"]["content"]["application/json"]["schema"])["title"] == "ErrorResponse"
    optimize = _component(openapi, _schema_of(openapi, "/v1/prompts/optimize"))
    assert list(optimize["properties"]) == OPTIMIZE_KEYS


def test_a_generation_answers_in_the_documented_shape(client):
    response = client.post("/v1/images/generations", json={"prompt": "a man", "size": "64x64", "seed": 4, "n": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == IMAGES_KEYS and list(body["usage"]) == USAGE_KEYS
    assert body["data"][1] == {"b64_json": "cG5nIDU=", "revised_prompt": PROMPT.prompt, "seed": 5}  # b"png 5"
    assert (body["output_format"], body["size"], body["warnings"]) == ("png", "64x64", list(PROMPT.warnings))
    usage = body["usage"]
    assert usage["input_tokens_details"] == {
        "text_tokens": 5,
        "image_tokens": 0,
        "cached_tokens": 16,
        "negative_prompt_cached_tokens": 77,
    }
    assert (usage["elapsed_ms"], usage["deadline_met"], usage["denoising_steps"], usage["strength"]) == (
        512.3,
        True,
        12,
        None,
    )
    assert response.headers["server-timing"] == "optimize;dur=1.0, denoise;dur=2.5"


def test_optimize_answers_in_the_documented_shape(client):
    response = client.post("/v1/prompts/optimize", json={"prompt": "a smiling Asian man, highly detailed"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == OPTIMIZE_KEYS
    assert body["attributes"] == {
        "identity": "Asian man",
        "expression": "smiling expression",
        "accessories": ["hat", "scarf"],
    }
    assert (body["original_tokens"], body["optimized_tokens"], body["saved_fraction"]) == (7, 5, round(1 - 5 / 7, 4))


def test_errors_keep_the_openai_shape(client, monkeypatch):
    bad = client.post("/v1/images/generations", json={"prompt": "a man", "n": "2"})
    assert bad.status_code == 400
    assert bad.json() == {
        "error": {
            "message": "invalid value for 'n': Input should be a valid integer",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_value",
        }
    }
    form = client.post("/v1/images/edits", files={"image": ("a.png", b"x")}, data={"prompt": "p", "strength": "2"})
    assert (form.status_code, form.json()["error"]["param"]) == (400, "strength")
    monkeypatch.setattr(routes, "_serving", routes.ServingState())  # nothing installed yet
    assert client.get("/healthz").status_code == 503
    assert client.get("/healthz").json()["error"]["type"] == "server_error"
