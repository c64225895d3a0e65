"""The Ray Serve application: four stage deployments behind one FastAPI ingress.

`serve run serve_config.yaml` imports `serve_app.app:build_app` and calls it with the
config's `args`; `fusionserve serve` reads the same file and calls `build_application`.
"""

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.denoiser import deployment as denoiser
from deployments.models import loading
from deployments.prompt import deployment as prompt_optimizer
from deployments.text_encoder import deployment as text_encoder
from deployments.vae import deployment as vae_codec
from serve_app.config import AppSettings
from serve_app.flow.metrics import PipelineMetrics
from serve_app.flow.pipeline import ImagePipeline
from serve_app.flow.quality_guard import LiveQualityGuard
from serve_app.flow.retry import RetryingHandle
from serve_app.flow.sampler_table import SamplerTable, sampler_table_for
from serve_app.flow.steps import StepController
from serve_app.http import routes as api

STAGE_NAMES = ("PromptOptimizer", "TextEncoder", "Denoiser", "VaeCodec")


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
@serve.ingress(api.app)
class Ingress:
    """Validates HTTP requests and drives them through the stages (one handle hop each)."""

    def __init__(
        self,
        prompt_optimizer,
        text_encoder,
        denoiser,
        vae_codec,
        settings: AppSettings,
        model_id: str,
        features: dict[str, bool | int] | None = None,
        sampler_table: SamplerTable | None = None,
    ):
        metrics = PipelineMetrics()

        def retried(handle: Any, stage: str) -> RetryingHandle:
            return RetryingHandle(handle, settings.retry, stage)

        pipeline = ImagePipeline(
            retried(prompt_optimizer, "PromptOptimizer"),
            retried(text_encoder, "TextEncoder"),
            retried(denoiser, "Denoiser"),
            retried(vae_codec, "VaeCodec"),
            StepController(settings.steps, sampler_table),
            LiveQualityGuard(settings.quality_guard),
            metrics,
            retry=settings.retry,
        )
        api.install(pipeline, settings, model_id, features, on_key_use=metrics.record_api_key)


def build_application(
    settings: AppSettings, deployment_options: dict[str, dict[str, Any]] | None = None
) -> Application:
    """Bind the DAG. `deployment_options` (by deployment name) are applied on top of the
    code defaults, as `serve run` applies a config file's `deployments:` entries."""
    options = deployment_options or {}
    unknown = set(options) - set(STAGE_NAMES) - {"Ingress"}
    if unknown:
        raise ValueError(f"unknown deployments in config: {sorted(unknown)}; known: {['Ingress', *STAGE_NAMES]}")
    model_path = loading.resolve_model(settings.model)  # builds the embedded model once, here
    settings = settings.with_native_size(loading.native_size(model_path))
    path = str(model_path)

    def configured(deployment, name):
        return deployment.options(**options[name]) if name in options else deployment

    threads = settings.threads_for
    return configured(Ingress, "Ingress").bind(
        configured(prompt_optimizer.build_deployment(), "PromptOptimizer").bind(path, settings.prompt),
        configured(text_encoder.build_deployment(), "TextEncoder").bind(
            path, threads("TextEncoder"), settings.text_encoder
        ),
        configured(denoiser.build_deployment(), "Denoiser").bind(path, threads("Denoiser"), settings.denoiser),
        configured(vae_codec.build_deployment(), "VaeCodec").bind(path, threads("VaeCodec")),
        settings,
        loading.model_id(model_path),
        loading.features(model_path),
        sampler_table_for(settings.steps.sampler_table, model_path),
    )


def build_app(args: AppSettings) -> Application:
    """Application builder for `serve run` / `serve deploy` (Ray validates `args` into AppSettings)."""
    return build_application(args)
