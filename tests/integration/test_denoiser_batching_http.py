"""Step-level batching in the served Denoiser: concurrent requests share UNet forwards,
and a request whose client left is dropped at the next step boundary."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import httpx
import pytest

from tests.integration.test_generation_http import generate, png_of

# One event loop for the test session's handles, running all the time in its own thread: a
# handle stays bound to the loop it first ran on, and it learns of a restarted replica only
# while that loop runs (Serve's long-poll updates; test_faults_http kills replicas).
_LOOP = asyncio.new_event_loop()
threading.Thread(target=_LOOP.run_forever, name="serve-handle-loop", daemon=True).start()


def denoiser_load(timeout_s: float = 60.0):
    from ray import serve

    async def fetch():
        handle = serve.get_deployment_handle("Denoiser", app_name="fusionserve")
        return await handle.load.remote()

    return asyncio.run_coroutine_threadsafe(fetch(), _LOOP).result(timeout=timeout_s)


def idle_denoiser_load(timeout_s: float = 60.0):
    """The Denoiser's load once nothing runs or waits there (earlier tests' work has drained)."""
    deadline = time.time() + timeout_s
    while True:
        load = denoiser_load()
        if load.active_jobs == load.waiting_jobs == load.background_jobs == 0:
            return load
        assert time.time() < deadline, f"the Denoiser is still busy after {timeout_s} s: {load}"
        time.sleep(0.2)


def test_concurrent_requests_share_unet_forwards(http):
    """Counted from this test's own counters' deltas: 4 requests x 12 steps of one image each
    ran in fewer than 48 forwards, so some forward carried more than one request's image."""
    before = idle_denoiser_load()
    bodies = [{"prompt": f"portrait {i}", "size": "64x64", "seed": 50 + i, "num_inference_steps": 12} for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda b: png_of(generate(http, **b)["data"][0]), bodies))
    after = denoiser_load()
    assert len(set(images)) == 4
    image_steps, forwards = after.image_steps - before.image_steps, after.steps_run - before.steps_run
    assert image_steps == 4 * 12  # this test's requests, and nothing else, ran meanwhile
    assert forwards < image_steps  # fewer forwards than one request at a time


def test_a_request_whose_client_left_is_dropped_from_the_batch(base_url):
    before = idle_denoiser_load()
    body = {"prompt": "portrait", "size": "256x256", "seed": 1, "num_inference_steps": 150}  # ~25 s of UNet work
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=3)
    assert_one_job_cancelled(before, steps=150, timeout_s=15)


def assert_one_job_cancelled(before, steps: int, timeout_s: float) -> None:
    """Since `before` (a load snapshot), one job left the batch cancelled before its `steps`
    ran, and nothing runs or waits (polled: the step loop drops it at its next boundary)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        load = denoiser_load()
        if load.cancelled_jobs > before.cancelled_jobs and load.active_jobs == 0:
            break
        time.sleep(0.5)
    assert load.cancelled_jobs == before.cancelled_jobs + 1
    assert load.active_jobs == 0 and load.waiting_jobs == 0
    assert load.steps_run - before.steps_run < steps
