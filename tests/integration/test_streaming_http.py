"""Streamed answers from the served app, read by the official `openai` client: events in
order, the final image equal to the unstreamed one, edits streamed too, a client that leaves
mid-stream cancels its job, and streamed and plain requests in flight together all answered."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx
import openai
import pytest

from tests.conftest import png_pixels
from tests.integration.test_denoiser_batching_http import assert_one_job_cancelled, idle_denoiser_load
from tests.integration.test_edits_http import TARGET


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)


def test_a_streamed_generation_previews_then_completes_with_the_unstreamed_image(client):
    fields = {"seed": 21, "num_inference_steps": 8}
    stream = client.images.generate(
        prompt="portrait of a smiling man", size="64x64", stream=True, partial_images=3, extra_body=fields
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:3]] == [0, 1, 2]
    assert [event.model_extra["steps_done"] for event in events[:3]] == [2, 4, 6]
    for event in events:
        assert png_pixels(base64.b64decode(event.b64_json)).shape == (64, 64, 3)
        assert (event.size, event.output_format, event.background) == ("64x64", "png", "opaque")
    completed = events[-1]
    assert completed.usage.input_tokens > 0 and completed.usage.model_extra["num_inference_steps"] == 8
    plain = client.images.generate(prompt="portrait of a smiling man", size="64x64", extra_body=fields)
    assert completed.b64_json == plain.data[0].b64_json


def test_a_short_run_streams_fewer_partial_images(client):
    stream = client.images.generate(
        prompt="portrait", size="64x64", stream=True, partial_images=3, extra_body={"seed": 2, "num_inference_steps": 2}
    )
    assert [event.type for event in stream] == ["image_generation.partial_image", "image_generation.completed"]


def test_a_streamed_edit_sends_image_edit_events(client):
    stream = client.images.edit(
        image=("target.png", TARGET, "image/png"),
        prompt="portrait of a smiling man",
        stream=True,
        partial_images=1,
        extra_body={"seed": 4, "num_inference_steps": 10, "strength": 0.5},
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[0].model_extra["steps_done"] in (2, 3)  # of the 5 steps strength 0.5 runs
    assert png_pixels(base64.b64decode(events[-1].b64_json)).shape == (64, 96, 3)


def test_a_client_that_leaves_mid_stream_cancels_its_job(base_url):
    before = idle_denoiser_load()
    body = {
        "prompt": "portrait",
        "size": "256x256",
        "seed": 1,
        "num_inference_steps": 150,
        "stream": True,
        "partial_images": 3,
    }  # ~25 s of UNet work; the first preview after 38 steps
    with httpx.stream("POST", f"{base_url}/v1/images/generations", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # leave after the first preview
    assert_one_job_cancelled(before, steps=150, timeout_s=20)


@pytest.mark.slow
def test_twenty_streamed_and_twenty_plain_requests_in_flight_are_all_answered(client):
    def streamed(i: int) -> list[str]:
        stream = client.images.generate(
            prompt=f"portrait {i}",
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body={"seed": i, "num_inference_steps": 6},
        )
        return [event.type for event in stream]

    def plain(i: int) -> int:
        response = client.images.generate(
            prompt=f"portrait {i}", size="64x64", extra_body={"seed": i, "num_inference_steps": 6}
        )
        return len(response.data)

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        streams = [pool.submit(streamed, i) for i in range(20)]
        plains = [pool.submit(plain, i) for i in range(20)]
        assert [future.result(timeout=300) for future in plains] == [1] * 20
        expected = ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [future.result(timeout=300) for future in streams] == [expected] * 20
