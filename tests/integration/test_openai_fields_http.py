"""The current OpenAI Images fields through the official `openai` client on the served app:
quality names, output formats, size "auto", and what is refused."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from deployments.models.loading import native_size
from serve_app.http.image_output import ImageOutput, encode_image
from tests.integration.test_edits_http import TARGET

FAST = {"seed": 11, "num_inference_steps": 4}  # extra_body: a short, reproducible run


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)


def image_of(response, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(response.data[index].b64_json)))


def test_quality_low_runs_in_the_fast_tier(client, serve_settings):
    settings, _ = serve_settings
    response = client.images.generate(prompt="portrait of a man", size="64x64", quality="low", extra_body={"seed": 3})
    low, high = settings.steps.ranges["fast"]
    steps = response.usage.model_extra["num_inference_steps"]
    assert low <= steps <= high, (steps, settings.steps.ranges)
    assert response.quality == "low"


def test_jpeg_output_decodes_as_jpeg_and_is_the_same_picture(client):
    png = client.images.generate(prompt="portrait of a man", size="64x64", extra_body=FAST)
    jpeg = client.images.generate(
        prompt="portrait of a man", size="64x64", output_format="jpeg", output_compression=95, extra_body=FAST
    )
    assert (jpeg.output_format, png.output_format) == ("jpeg", "png")
    assert (image_of(jpeg).format, image_of(png).format) == ("JPEG", "PNG")
    # the same seed's PNG, encoded as JPEG: the served bytes exactly
    expected = encode_image(base64.b64decode(png.data[0].b64_json), ImageOutput("jpeg", 95))
    assert base64.b64decode(jpeg.data[0].b64_json) == expected


def test_output_compression_changes_the_jpeg_size(client):
    sizes = [
        len(
            base64.b64decode(
                client.images.generate(
                    prompt="portrait of a man",
                    size="128x128",
                    output_format="jpeg",
                    output_compression=level,
                    extra_body=FAST,
                )
                .data[0]
                .b64_json
            )
        )
        for level in (10, 95)
    ]
    assert sizes[0] < sizes[1]


def test_webp_output(client):
    response = client.images.generate(prompt="portrait", size="64x64", output_format="webp", extra_body=FAST)
    assert (response.output_format, image_of(response).format) == ("webp", "WEBP")


def test_size_auto_is_the_models_native_size(client, tiny_model_path):
    side = native_size(tiny_model_path)
    response = client.images.generate(
        prompt="portrait", size="auto", background="auto", moderation="low", extra_body=FAST
    )
    assert response.size == f"{side}x{side}"
    assert image_of(response).size == (side, side)
    assert response.background == "opaque"


def test_edit_with_size_auto_and_jpeg(client):
    response = client.images.edit(
        image=("b.png", TARGET, "image/png"),
        prompt="smiling",
        size="auto",
        output_format="jpeg",
        input_fidelity="high",
        extra_body=FAST,
    )
    assert response.size == "96x64"  # the target's
    assert (image_of(response).format, image_of(response).size) == ("JPEG", (96, 64))


def test_a_transparent_background_is_refused(client):
    with pytest.raises(openai.BadRequestError) as transparent:
        client.images.generate(prompt="portrait", size="64x64", background="transparent")
    assert transparent.value.body["param"] == "background"
    assert "opaque" in transparent.value.body["message"]
