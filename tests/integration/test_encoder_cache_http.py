"""The text encoder's prefix cache through the served DAG: hits are visible, images exact."""

from __future__ import annotations

from serve_app.flow.request import ImageRequest
from tests.conftest import run
from tests.integration.conftest import metric_lines
from tests.integration.test_generation_http import generate, png_of

NAMESPACE = "studio-portrait"  # its template (>= 15 tokens) fills the first 16-token block


def test_prefix_and_exact_hits_render_what_an_uncached_encoder_renders(http, tiny_model_path, serve_settings):
    from serve_app.flow.pipeline import local_pipeline_for

    settings, _ = serve_settings
    common = {"size": "64x64", "seed": 5, "num_inference_steps": 4, "cache_namespace": NAMESPACE}
    generate(http, prompt="a smiling Asian man, about 35, wearing glasses", **common)  # the template's block
    second = generate(http, prompt="an elderly woman with long red hair, side view", **common)
    again = generate(http, prompt="an elderly woman with long red hair, side view", **common)
    details = second["usage"]["input_tokens_details"]
    assert details["cached_tokens"] == 16  # the template block, not a token of the woman
    assert details["negative_prompt_cached_tokens"] == 77  # the default negative prompt: exact hit
    assert again["usage"]["input_tokens_details"]["cached_tokens"] == 77
    assert png_of(second["data"][0]) == png_of(again["data"][0])

    no_cache = settings.text_encoder.model_copy(
        update={"cache": settings.text_encoder.cache.model_copy(update={"enabled": False})}
    )
    uncached = local_pipeline_for(tiny_model_path, settings.model_copy(update={"text_encoder": no_cache}))
    request = ImageRequest(
        prompt="an elderly woman with long red hair, side view",
        negative_prompt="",
        width=64,
        height=64,
        n=1,
        seed=5,
        guidance_scale=settings.default_guidance_scale,
        num_inference_steps=4,
        cache_namespace=NAMESPACE,
    )
    result = run(uncached.generate(request))
    assert result.usage.input_tokens_details.cached_tokens == 0
    assert png_of(second["data"][0]) == result.images_png[0]


def test_cache_counters_reach_rays_metrics_endpoint(http):
    generate(
        http,
        prompt="portrait of a bald man",
        size="64x64",
        seed=1,
        num_inference_steps=2,
        cache_namespace="metrics-check",
    )
    lines, text = metric_lines("ray_fusionserve_encoder_window_tokens", 'namespace="metrics-check"')
    assert lines, "ray_fusionserve_encoder_window_tokens{namespace=metrics-check} not exported"
    assert float(lines[0].rsplit(" ", 1)[1]) >= 154  # prompt + negative prompt, 77 positions each
    assert "ray_fusionserve_encoder_cache_bytes" in text
    assert "ray_fusionserve_denoiser_step_ms" in text and "ray_fusionserve_denoiser_queued_steps" in text


def test_affinity_router_keeps_a_prefix_on_the_replica_that_cached_it(base_url, tiny_model_path):
    """Two TextEncoder replicas behind PrefixAffinityRouter (as serve_config.yaml configures
    it): every request after a key's first finds the key's blocks cached. With Serve's
    default router half of the keys' second requests would land on the other replica."""
    import asyncio

    from ray import serve

    from deployments.models.loading import load_tokenizer
    from deployments.prompt.optimizer import routing_key_for
    from deployments.text_encoder import deployment as text_encoder

    tokenizer = load_tokenizer(tiny_model_path)
    app = (
        text_encoder.build_deployment()
        .options(
            num_replicas=2,
            ray_actor_options={"num_cpus": 0.1},
            graceful_shutdown_timeout_s=1,
            request_router_config={
                "request_router_class": "deployments.text_encoder.router:PrefixAffinityRouter",
                "request_router_kwargs": {"busy_threshold": 8},
            },
        )
        .bind(str(tiny_model_path), 1, {})
    )
    handle = serve.run(app, name="routing-check", route_prefix=None)
    templates = [
        f"template number {i}: a studio portrait with soft light and a plain background, sharp" for i in range(8)
    ]

    async def send_all():
        cached = {}
        for round_ in range(3):
            for i, template in enumerate(templates):
                prompt = f"{template}, person {round_}"
                ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
                encoding = await handle.encode.remote(
                    [prompt], namespace="routing", routing_key=routing_key_for(ids, "routing")
                )
                cached.setdefault(i, []).append(encoding.cached_tokens[0])
        return cached

    try:
        cached = asyncio.run(send_all())
    finally:
        serve.delete("routing-check", _blocking=False)  # its replicas go away in the background
    assert all(counts[0] == 0 and min(counts[1:]) >= 16 for counts in cached.values()), cached
