"""The real `openai` Python client against the server."""

from __future__ import annotations

import base64

import openai
import pytest

from tests.conftest import png_pixels


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)


def test_images_generate(client, http):
    response = client.images.generate(
        prompt="portrait of a smiling man", size="256x256", extra_body={"seed": 5, "num_inference_steps": 4}
    )
    png = base64.b64decode(response.data[0].b64_json)
    assert png_pixels(png).shape == (256, 256, 3)
    assert response.data[0].revised_prompt == "man, smiling expression"  # the prompt optimizer's work
    assert response.usage.input_tokens == 4
    assert response.usage.model_extra["original_input_tokens"] == 5
    same = http.post(
        "/v1/images/generations",
        json={"prompt": "portrait of a smiling man", "size": "256x256", "seed": 5, "num_inference_steps": 4},
    ).json()
    assert base64.b64decode(same["data"][0]["b64_json"]) == png


def test_images_generate_n(client):
    response = client.images.generate(
        prompt="portrait",
        size="64x64",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 9, "num_inference_steps": 3},
    )
    assert len(response.data) == 2
    assert response.data[0].b64_json != response.data[1].b64_json


def test_bad_request_raises_with_param(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="portrait", size="100x100")
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "size"
    assert "multiples of 8" in caught.value.body["message"]


def test_models_list_names_the_served_model(client, http):
    models = client.models.list()
    assert [model.id for model in models.data] == [http.get("/healthz").json()["model"]]
    assert models.data[0].id.startswith("tiny-")
