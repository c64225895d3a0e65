"""`fusionserve status`'s report from one scrape (the served check: tests/integration/test_status_cli.py)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.samples import Sample

from serve_app.ops import status

NAMESPACE = {"namespace": "studio-portrait"}


def report_of(samples: list[Sample]) -> dict:
    return status.summarize("fusionserve", report_application(), samples)


def test_a_namespace_template_is_not_reported_as_the_optimizers_cost():
    """Three short prompts of 3 tokens in a namespace whose template adds 18 tokens to each: the
    optimizer kept the user's 3 tokens (0% saved); counting the template read -600%."""
    samples = [
        Sample("ray_fusionserve_prompt_original_tokens_total", NAMESPACE, 9.0),
        Sample("ray_fusionserve_prompt_optimized_tokens_total", NAMESPACE, 9.0 + 3 * 18),
        Sample("ray_fusionserve_prompt_template_tokens_total", NAMESPACE, 3 * 18.0),
    ]
    report = report_of(samples)
    assert report["prompt_tokens_saved"] == 0.0
    assert report["template_tokens"] == 54
    text = status.render(report)
    assert "prompt optimizer: 0% of the user's prompt tokens saved; namespace templates added 54 tokens" in text


def test_without_templates_the_saving_is_the_optimizers():
    samples = [
        Sample("ray_fusionserve_prompt_original_tokens_total", {}, 40.0),
        Sample("ray_fusionserve_prompt_optimized_tokens_total", {}, 30.0),
    ]
    assert report_of(samples)["prompt_tokens_saved"] == 0.25


def test_restarts_are_reported_per_stage():
    report = status.summarize("fusionserve", report_application(), [], {"Denoiser": 2})
    assert report["stages"]["Denoiser"]["restarts"] == 2
    rendered = status.render(report)
    assert "restarts" in rendered and "│ 2 " in rendered


def report_application() -> SimpleNamespace:
    deployment = SimpleNamespace(status="HEALTHY", replica_states={"RUNNING": 1})
    return SimpleNamespace(status="RUNNING", deployments={"Denoiser": deployment})
