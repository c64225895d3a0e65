"""`fusionserve status`: what runs, read from Serve's status API and Ray's metrics port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from serve_app.ops import status
from tests.integration.test_generation_http import generate

NAMESPACE = "status-check"  # a namespace of its own: its counters hold this test's request only
COUNTERS = {
    "original": "ray_fusionserve_prompt_original_tokens_total",
    "optimized": "ray_fusionserve_prompt_optimized_tokens_total",
    "window": "ray_fusionserve_encoder_window_tokens_total",
    "cached": "ray_fusionserve_encoder_cached_tokens_total",
}


def namespace_counters(samples) -> dict[str, float]:
    return {key: status.metric_sum(samples, name, namespace=NAMESPACE) for key, name in COUNTERS.items()}


def scrape_until(ready: Callable[[list], bool], timeout_s: float = 60.0) -> list:
    """One scrape of every node's metrics in which `ready` holds, or the last one after the
    timeout (custom metrics reach the port every few seconds, each metric on its own)."""
    deadline = time.time() + timeout_s
    while True:
        samples = status.scrape(status.metrics_urls())
        if ready(samples) or time.time() > deadline:
            return samples
        time.sleep(2)


def test_status_reports_every_stage_and_the_live_figures(http, tiny_model_path):
    from ray import serve

    from deployments.models import loading

    body = generate(
        http,
        prompt="portrait of a status check",
        size="64x64",
        seed=1,
        num_inference_steps=2,
        cache_namespace=NAMESPACE,
    )
    usage = body["usage"]
    window = loading.load_tokenizer(tiny_model_path).model_max_length  # positions per encoded text
    details = usage["input_tokens_details"]
    expected = {
        "original": usage["original_input_tokens"],
        "optimized": usage["input_tokens"],
        "window": 2 * window,  # the prompt and the negative prompt
        "cached": details["cached_tokens"] + details["negative_prompt_cached_tokens"],
    }
    latency = "ray_serve_deployment_processing_latency_ms"

    def denoiser_requests(samples) -> float:
        return status.metric_sum(samples, f"{latency}_count", deployment="Denoiser")

    samples = scrape_until(lambda samples: namespace_counters(samples) == expected and denoiser_requests(samples) >= 1)
    assert namespace_counters(samples) == expected  # this test's request, counted exactly

    report = status.summarize("fusionserve", serve.status().applications["fusionserve"], samples)
    assert report["status"] == "RUNNING"
    assert set(report["stages"]) == {"Ingress", "PromptOptimizer", "TextEncoder", "Denoiser", "VaeCodec"}
    assert all(stage["running"] >= 1 and stage["status"] == "HEALTHY" for stage in report["stages"].values())
    # the report's figures are the ratios of the counters summed over every namespace
    total = {key: status.metric_sum(samples, name) for key, name in COUNTERS.items()}
    template = status.metric_sum(samples, "ray_fusionserve_prompt_template_tokens_total")
    assert report["template_tokens"] == template  # a templated namespace's share, counted apart
    assert report["prompt_tokens_saved"] == pytest.approx(1 - (total["optimized"] - template) / total["original"])
    assert report["encoder_cache_hit_rate"] == pytest.approx(total["cached"] / total["window"])
    requests = denoiser_requests(samples)
    assert requests >= 1  # this test's request, at least
    expected_ms = status.metric_sum(samples, f"{latency}_sum", deployment="Denoiser") / requests
    assert report["stages"]["Denoiser"]["mean_latency_ms"] == pytest.approx(expected_ms)

    collected = status.collect("fusionserve")  # the same, scraped again: what `fusionserve status` shows
    assert set(collected["stages"]) == set(report["stages"]) and collected["metrics_endpoints"] is None
    text = status.render(report)
    assert "Denoiser" in text
    assert f"text encoder cache: hit rate {report['encoder_cache_hit_rate']:.0%} of window tokens" in text
    assert f"prompt optimizer: {report['prompt_tokens_saved']:.0%} of the user's prompt tokens saved" in text


def test_status_cli_connects_to_the_running_cluster(http):
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cli", "status", "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["application"] == "fusionserve" and report["status"] == "RUNNING"
    assert report["stages"]["Denoiser"]["running"] >= 1
    missing = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cli", "status", "--app", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no application 'nope' is running" in missing.stderr
