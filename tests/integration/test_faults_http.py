"""A crashed replica costs no request: each stage's replica process in turn (Denoiser,
TextEncoder, VaeCodec, PromptOptimizer; the first, if autoscaling added one) is SIGKILLed while
generations are in flight and arriving, a streamed one among them; every request is answered
200 (the calls are retried once Serve has restarted the replica) with the image the same
request gets without a fault, and the app is healthy afterwards."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

from tests.conftest import max_pixel_diff
from tests.integration.test_generation_http import png_of


def replica_pids(deployment: str) -> list[int]:
    """The process ids of the session app's live replicas of `deployment`."""
    from serve_app.ops.replicas import replica_pids as pids_of

    return pids_of("fusionserve", deployment)


def streamed_events(base_url: str, body: dict) -> list[tuple[str, dict]]:
    events, name = [], None
    with httpx.stream("POST", f"{base_url}/v1/images/generations", json=body, timeout=180) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    return events


def body(stage: str, index: int) -> dict:
    return {"prompt": f"portrait {stage} {index}", "size": "64x64", "seed": 300 + index, "num_inference_steps": 20}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["Denoiser", "TextEncoder", "VaeCodec", "PromptOptimizer"])
def test_a_killed_replica_costs_no_request(stage, base_url, http):
    pid = replica_pids(stage)[0]  # autoscaling may have added one: kill the first
    streamed = {**body(stage, 99), "stream": True, "partial_images": 3}
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        stream = pool.submit(streamed_events, base_url, streamed)
        plain = []
        for index in range(8):  # requests in flight and arriving across the kill
            plain.append(pool.submit(http.post, "/v1/images/generations", json=body(stage, index)))
            if index == 3:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.4)
        answers = [future.result(timeout=180) for future in plain]
        events = stream.result(timeout=180)
    assert [answer.status_code for answer in answers] == [200] * 8, [a.text[:300] for a in answers]
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [data["partial_image_index"] for _, data in events[:3]] == [0, 1, 2]
    deadline = time.time() + 60
    while not (new := replica_pids(stage)) or pid in new:
        assert time.time() < deadline, f"{stage} was not restarted"
        time.sleep(0.5)
    # the answers are the no-fault images of the same requests (within the batch tolerance:
    # a request re-sent alone runs in another batch, whose matmuls may round differently)
    for index in (3, 4):
        again = http.post("/v1/images/generations", json=body(stage, index))
        assert max_pixel_diff(png_of(again.json()["data"][0]), png_of(answers[index].json()["data"][0])) <= 1
    plain_stream = http.post("/v1/images/generations", json=body(stage, 99)).json()["data"][0]
    assert max_pixel_diff(png_of(events[-1][1]), png_of(plain_stream)) <= 1
    assert http.get("/healthz").status_code == 200
