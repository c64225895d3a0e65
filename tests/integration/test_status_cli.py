"""`fusionserve status`: what runs, read from Serve's status API and Ray's metrics port."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from serve_app.ops import status
from tests.integration.test_generation_http import generate


def test_status_reports_every_stage_and_the_live_figures(http):
    generate(http, prompt="portrait of a status check", size="64x64", seed=1, num_inference_steps=2)
    deadline = time.time() + 40  # custom metrics reach the port every few seconds
    while True:
        report = status.collect("fusionserve")
        exported = report["encoder_cache_hit_rate"] is not None and report["prompt_tokens_saved"] is not None
        if exported or time.time() > deadline:
            break
        time.sleep(2)
    assert report["status"] == "RUNNING"
    assert set(report["stages"]) == {"Ingress", "PromptOptimizer", "TextEncoder", "Denoiser", "VaeCodec"}
    assert all(stage["running"] >= 1 and stage["status"] == "HEALTHY" for stage in report["stages"].values())
    assert 0.0 <= report["encoder_cache_hit_rate"] <= 1.0
    assert report["prompt_tokens_saved"] < 1.0  # the optimizer's token counters reached the metrics port
    assert report["stages"]["Denoiser"]["mean_latency_ms"] > 0
    text = status.render(report)
    assert "Denoiser" in text and "text encoder cache: hit rate" in text


def test_status_cli_connects_to_the_running_cluster(http):
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cli", "status", "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["stages"]["Denoiser"]["running"] >= 1
    missing = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cli", "status", "--app", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no application 'nope' is running" in missing.stderr
