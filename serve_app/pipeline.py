"""The request flow as plain async code over four stage handles.

A stage handle is anything with `handle.<method>.remote(*args)` returning an awaitable:
a Ray Serve `DeploymentHandle` when served, a `LocalHandle` around the engine in-process
(the CLI, tests and the in-process benchmark). The flow is the same code in both.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deployments.denoiser import DenoiseJob
from deployments.prompt_optimizer import OptimizedPrompt
from deployments.text_encoder import Encoding
from deployments.serial_executor import SerialExecutor
from serve_app.request import ImageRequest
from serve_app.steps import StepController, StepDecision


class _LocalMethod:
    def __init__(self, function: Callable, executor: SerialExecutor, extra_kwargs: dict):
        self._function = function
        self._executor = executor
        self._extra_kwargs = extra_kwargs

    def remote(self, *args, **kwargs):
        return self._executor.run(self._function, *args, **kwargs, **self._extra_kwargs)


class LocalHandle:
    """DeploymentHandle look-alike over an in-process engine: calls run one at a time in
    arrival order on the engine's own thread, as one replica serves them."""

    def __init__(self, engine: Any, extra_kwargs: dict[str, dict] | None = None):
        self._engine = engine
        self._executor = SerialExecutor(type(engine).__name__)
        self._extra_kwargs = extra_kwargs or {}

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._engine, name), self._executor, self._extra_kwargs.get(name, {}))


@dataclass
class GenerationResult:
    images_png: list[bytes]
    seeds: list[int]
    prompt: OptimizedPrompt
    steps: StepDecision
    usage: dict = field(default_factory=dict)
    stage_ms: dict[str, float] = field(default_factory=dict)  # wall time per stage call, hop included


@contextmanager
def _timed(stage_ms: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    stage_ms[stage] = (time.perf_counter() - start) * 1000.0


def usage_of(prompt: OptimizedPrompt, steps: StepDecision, encoding: Encoding) -> dict:
    """OpenAI Images `usage` shape, plus what we add (steps and why, truncation)."""
    return {
        "input_tokens": prompt.prompt_tokens,
        "input_tokens_details": {
            "text_tokens": prompt.prompt_tokens,
            "image_tokens": 0,
            # window positions (77 per text) the text encoder took from its cache: prompt, negative
            "cached_tokens": encoding.cached_tokens[0],
            "negative_prompt_cached_tokens": encoding.cached_tokens[1],
        },
        "output_tokens": 0,
        "total_tokens": prompt.prompt_tokens,
        "original_input_tokens": prompt.original_tokens,  # before the prompt optimizer
        "prefix_tokens": prompt.prefix_tokens,
        "negative_prompt_tokens": prompt.negative_prompt_tokens,
        "truncated_tokens": prompt.truncated_tokens,
        "num_inference_steps": steps.steps,
        "steps_reason": steps.reason,
    }


class ImagePipeline:
    def __init__(self, prompt_optimizer, text_encoder, denoiser, vae_codec, step_controller: StepController):
        self.prompt_optimizer = prompt_optimizer
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae_codec = vae_codec
        self.step_controller = step_controller

    async def optimize_prompt(self, prompt: str, negative_prompt: str = "",
                              cache_namespace: str = "default") -> OptimizedPrompt:
        return await self.prompt_optimizer.optimize.remote(prompt, negative_prompt, cache_namespace, True)

    async def generate(self, request: ImageRequest) -> GenerationResult:
        stage_ms: dict[str, float] = {}
        with _timed(stage_ms, "optimize"):
            prompt: OptimizedPrompt = await self.prompt_optimizer.optimize.remote(
                request.prompt, request.negative_prompt, request.cache_namespace, request.optimize_prompt
            )
        # One encoder call for both texts: [0] conditional, [1] unconditional / negative.
        with _timed(stage_ms, "encode"):
            encoding: Encoding = await self.text_encoder.encode.remote(
                [prompt.prompt, prompt.negative_prompt], namespace=prompt.cache_namespace, routing_key=prompt.routing_key
            )
        embeddings = encoding.hidden
        steps = self.step_controller.choose(request)
        job = DenoiseJob(
            prompt_embeds=embeddings[0:1],
            negative_prompt_embeds=embeddings[1:2],
            height=request.height,
            width=request.width,
            seeds=request.seeds,
            num_inference_steps=steps.steps,
            guidance_scale=request.guidance_scale,
        )
        with _timed(stage_ms, "denoise"):
            latents = await self.denoiser.denoise.remote(job)
        with _timed(stage_ms, "decode"):
            images = await self.vae_codec.decode_png.remote(latents)
        return GenerationResult(images, request.seeds, prompt, steps, usage_of(prompt, steps, encoding), stage_ms)


def local_pipeline(
    model_path: Path,
    num_threads: int | None = None,
    default_steps: int = 20,
    on_step: Callable[[int, int], None] | None = None,
    stage_threads: dict[str, int] | None = None,
    prompt_settings: dict | None = None,
    encoder_cache: dict | None = None,
    denoiser_settings: dict | None = None,
) -> ImagePipeline:
    """All four engines in this process, no Ray. `stage_threads` overrides `num_threads`
    per stage, as AppSettings.stage_threads does for the served replicas."""
    stage_threads = stage_threads or {}
    from deployments.denoiser import DenoiserEngine
    from deployments.prompt_optimizer import PromptOptimizerEngine
    from deployments.text_encoder import TextEncoderEngine
    from deployments.vae_codec import VaeCodecEngine

    denoise_kwargs = {"denoise": {"on_step": on_step}} if on_step else None
    return ImagePipeline(
        prompt_optimizer=LocalHandle(PromptOptimizerEngine(model_path, **(prompt_settings or {}))),
        text_encoder=LocalHandle(
            TextEncoderEngine(model_path, stage_threads.get("TextEncoder", num_threads), encoder_cache)),
        denoiser=LocalHandle(DenoiserEngine(model_path, stage_threads.get("Denoiser", num_threads), denoiser_settings),
                            denoise_kwargs),
        vae_codec=LocalHandle(VaeCodecEngine(model_path, stage_threads.get("VaeCodec", num_threads))),
        step_controller=StepController(default_steps),
    )


def local_pipeline_for(model_path: Path, settings, on_step: Callable[[int, int], None] | None = None) -> ImagePipeline:
    """`local_pipeline` configured as the served application is (an `AppSettings`): same
    thread counts, so the same bytes; same prompt templates and encoder cache."""
    return local_pipeline(model_path, settings.num_threads, settings.steps.default_steps, on_step=on_step,
                          stage_threads=settings.stage_threads, prompt_settings=settings.prompt.model_dump(),
                          encoder_cache=settings.text_encoder.cache.model_dump(),
                          denoiser_settings=settings.denoiser.model_dump())
