"""`fusionserve status`: the running application in a terminal, for people without a browser.

Replicas per stage come from Serve's status API; queue depths, the encoder cache's hit rate
and latency from the Prometheus text on each Ray node's metrics export port (what the
dashboard's metrics views and Grafana read). Custom metrics reach that port ~10 s after
they change. Restarts are the replicas that died unexpectedly, from Ray's actor table.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

STAGES = ("Ingress", "PromptOptimizer", "TextEncoder", "Denoiser", "VaeCodec")
LATENCY_METRIC = "ray_serve_deployment_processing_latency_ms"
DENOISER_GAUGES = ("waiting_jobs", "active_jobs", "active_images", "queued_steps")


def scrape(urls: list[str], timeout_s: float = 5.0) -> list[Sample]:
    """Every sample on the given metrics endpoints."""
    samples: list[Sample] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                text = response.read().decode()
        except OSError:
            continue  # a node going away while we look
        for family in text_string_to_metric_families(text):
            samples.extend(family.samples)
    return samples


def metrics_urls() -> list[str]:
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name` over every series (and node) whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _mean_latency_ms(samples: list[Sample], deployment: str) -> float | None:
    """Mean processing latency of a deployment since start (histogram sum / count)."""
    total = metric_sum(samples, LATENCY_METRIC + "_sum", deployment=deployment)
    count = metric_sum(samples, LATENCY_METRIC + "_count", deployment=deployment)
    return total / count if count else None


def _state_name(state: Any) -> str:
    return str(getattr(state, "value", state))


def collect(app_name: str = "fusionserve", urls: list[str] | None = None) -> dict[str, Any]:
    """The status as a JSON-able dict (what `fusionserve status --json` prints)."""
    from ray import serve

    status = serve.status()
    application = status.applications.get(app_name)
    if application is None:
        raise LookupError(f"no application {app_name!r} is running (running: {sorted(status.applications) or 'none'})")
    from serve_app.ops.replicas import replica_deaths

    samples = scrape(metrics_urls() if urls is None else urls)
    report = summarize(app_name, application, samples, replica_deaths(app_name))
    report["metrics_endpoints"] = len(urls) if urls is not None else None
    return report


def summarize(
    app_name: str, application: Any, samples: list[Sample], restarts: dict[str, int] | None = None
) -> dict[str, Any]:
    """The report from Serve's status of one application, one scrape of the metrics and the
    replicas that died unexpectedly (by deployment)."""
    restarts = restarts or {}
    original = metric_sum(samples, "ray_fusionserve_prompt_original_tokens_total")
    optimized = metric_sum(samples, "ray_fusionserve_prompt_optimized_tokens_total")
    template = metric_sum(samples, "ray_fusionserve_prompt_template_tokens_total")
    window = metric_sum(samples, "ray_fusionserve_encoder_window_tokens_total")
    cached = metric_sum(samples, "ray_fusionserve_encoder_cached_tokens_total")
    return {
        "application": app_name,
        "status": _state_name(application.status),
        "stages": {
            name: {**_stage(name, deployment, samples), "restarts": restarts.get(name, 0)}
            for name, deployment in application.deployments.items()
        },
        "denoiser": {name: metric_sum(samples, f"ray_fusionserve_denoiser_{name}") for name in DENOISER_GAUGES},
        # the user's prompts only: a namespace template is the server's text, not the optimizer's cost
        "prompt_tokens_saved": 1 - (optimized - template) / original if original else None,
        "template_tokens": template,
        "encoder_cache_hit_rate": cached / window if window else None,
        "encoder_cache_bytes": metric_sum(samples, "ray_fusionserve_encoder_cache_bytes"),
        "deadline_misses": metric_sum(samples, "ray_fusionserve_deadline_misses_total"),
    }


def _stage(name: str, deployment: Any, samples: list[Sample]) -> dict[str, Any]:
    replicas: dict[str, int] = defaultdict(int)
    for state, count in deployment.replica_states.items():
        replicas[_state_name(state)] += count
    return {
        "status": _state_name(deployment.status),
        "replicas": dict(replicas),
        "running": replicas.get("RUNNING", 0),
        "mean_latency_ms": _mean_latency_ms(samples, name),
    }


def render(report: dict[str, Any]) -> str:
    """The report as a rich table, rendered to text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['application']}: {report['status']}")
    for column in ("stage", "status", "replicas running", "other replica states", "restarts", "mean latency"):
        table.add_column(column)
    ordered = sorted(report["stages"], key=lambda n: STAGES.index(n) if n in STAGES else len(STAGES))
    for name in ordered:
        stage = report["stages"][name]
        others = ", ".join(f"{k.lower()} {v}" for k, v in stage["replicas"].items() if k != "RUNNING") or "-"
        latency = "-" if stage["mean_latency_ms"] is None else f"{stage['mean_latency_ms']:.0f} ms"
        table.add_row(name, stage["status"], str(stage["running"]), others, str(stage["restarts"]), latency)
    denoiser = report["denoiser"]
    hit = report["encoder_cache_hit_rate"]
    console = Console(record=True, width=100)
    console.print(table)
    console.print(
        f"denoiser: {denoiser['active_images']:.0f} images in the batch, {denoiser['waiting_jobs']:.0f} jobs "
        f"waiting, {denoiser['queued_steps']:.0f} image-steps queued"
    )
    saved = report["prompt_tokens_saved"]
    console.print(
        f"prompt optimizer: {'-' if saved is None else f'{saved:.0%}'} of the user's prompt tokens saved; "
        f"namespace templates added {report['template_tokens']:.0f} tokens"
    )
    console.print(
        f"text encoder cache: hit rate {'-' if hit is None else f'{hit:.0%}'} of window tokens, "
        f"{report['encoder_cache_bytes'] / 2**20:.1f} MiB; deadline misses: {report['deadline_misses']:.0f}"
    )
    return console.export_text()
