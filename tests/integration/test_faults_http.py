"""A crashed replica costs no request: the Denoiser's replica process is SIGKILLed while
generations (plain and streamed) are in flight; every request is answered 200 (the calls are
retried once Serve has restarted the replica) with the image the same request gets without a
fault, and the app is healthy afterwards."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest


def replica_pids(deployment: str) -> list[int]:
    """The process ids of the deployment's live replicas (Serve names its replica actors
    SERVE_REPLICA::APP#DEPLOYMENT#ID in the `serve` namespace)."""
    import ray

    pids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::fusionserve#{deployment}#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids.append(ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=30))
    return pids


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


@pytest.mark.slow
def test_a_killed_denoiser_replica_costs_no_request(base_url, http):
    bodies = [
        {"prompt": f"portrait {i}", "size": "128x128", "seed": 70 + i, "num_inference_steps": 40} for i in range(3)
    ]
    streamed = {**bodies[0], "seed": 80, "stream": True, "partial_images": 3}
    (pid,) = replica_pids("Denoiser")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(http.post, "/v1/images/generations", json=body) for body in bodies]
        stream = pool.submit(streamed_events, base_url, streamed)
        time.sleep(2.0)  # the jobs are in the step loop by now
        os.kill(pid, signal.SIGKILL)
        answers = [future.result(timeout=180) for future in plain]
        events = stream.result(timeout=180)
    assert [answer.status_code for answer in answers] == [200, 200, 200], [a.text[:300] for a in answers]
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [data["partial_image_index"] for _, data in events[:3]] == [0, 1, 2]
    new_pids = replica_pids("Denoiser")
    assert len(new_pids) == 1 and new_pids != [pid]  # Serve restarted it
    # the images equal the no-fault ones of the same seeds
    for body, answer in zip(bodies, answers):
        again = http.post("/v1/images/generations", json=body)
        assert again.json()["data"][0]["b64_json"] == answer.json()["data"][0]["b64_json"]
    unstreamed = http.post(
        "/v1/images/generations", json={k: v for k, v in streamed.items() if k not in ("stream", "partial_images")}
    )
    assert base64.b64decode(events[-1][1]["b64_json"]) == base64.b64decode(unstreamed.json()["data"][0]["b64_json"])
    assert http.get("/healthz").status_code == 200
