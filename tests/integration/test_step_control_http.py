"""The step controller through HTTP: per-request policy, deadline and quality; metrics."""

from __future__ import annotations

from tests.integration.conftest import metric_lines
from tests.integration.test_generation_http import generate

BUSY = (
    "A young woman with long curly red hair and freckles, smiling, wearing earrings and a green scarf, "
    "soft window light, bokeh background"
)
COMMON = {"size": "64x64", "seed": 4}


def usage(http, **body) -> dict:
    return generate(http, **COMMON, **body)["usage"]


def test_policies_and_quality_tiers_per_request(http):
    simple = usage(http, prompt="portrait", step_policy="complexity")
    busy = usage(http, prompt=BUSY, step_policy="complexity")
    assert (simple["num_inference_steps"], simple["steps_reason"]) == (15, "complexity")
    assert 15 < busy["num_inference_steps"] <= 30 and busy["steps_complexity"] > simple["steps_complexity"]
    fast, best = (usage(http, prompt=BUSY, step_policy="complexity", quality=q) for q in ("fast", "best"))
    assert 15 <= fast["num_inference_steps"] <= 20 and 25 <= best["num_inference_steps"] <= 40
    assert best["num_inference_steps"] > busy["num_inference_steps"] > fast["num_inference_steps"]
    fixed = usage(http, prompt=BUSY, step_policy="fixed")
    assert (fixed["num_inference_steps"], fixed["steps_reason"]) == (20, "fixed")  # serve_config.yaml fixed_steps


def test_a_deadline_selects_slo_and_explicit_steps_win(http):
    loose = usage(http, prompt=BUSY, deadline_ms=600_000)
    assert loose["steps_policy"] == "slo" and loose["deadline_met"] is True
    complexity = usage(http, prompt=BUSY, step_policy="complexity")
    assert loose["num_inference_steps"] == complexity["num_inference_steps"]  # idle server: no steps given away
    impossible = usage(http, prompt=BUSY, deadline_ms=1)
    assert (impossible["num_inference_steps"], impossible["steps_reason"]) == (15, "slo:infeasible")
    assert impossible["deadline_met"] is False and impossible["predicted_ms"] > 1
    explicit = usage(http, prompt=BUSY, deadline_ms=1, num_inference_steps=3)
    assert (explicit["num_inference_steps"], explicit["steps_reason"]) == (3, "explicit")


def test_steps_and_deadline_misses_reach_rays_metrics_endpoint(http):
    usage(http, prompt="portrait", deadline_ms=1)  # a miss
    misses, text = metric_lines("ray_fusionserve_deadline_misses", 'policy="slo"')
    assert misses and float(misses[0].rsplit(" ", 1)[1]) >= 1
    assert "ray_fusionserve_steps_chosen_bucket" in text and 'reason="slo:infeasible"' in text
