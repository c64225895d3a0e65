"""The request flow as plain async code over four stage handles.

A stage handle is anything with `handle.<method>.remote(*args)` returning an awaitable:
a Ray Serve `DeploymentHandle` when served, a `LocalHandle` around the engine in-process
(the CLI, tests and the in-process benchmark). The flow is the same code in both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.common.serial_executor import SerialExecutor
from deployments.denoiser.engine import DenoiseJob
from deployments.prompt.optimizer import OptimizedPrompt
from deployments.text_encoder.engine import Encoding
from serve_app.config import QualityGuardSettings, StepSettings
from serve_app.flow.quality_guard import LiveQualityGuard
from serve_app.flow.request import ImageRequest
from serve_app.flow.steps import StepController, StepDecision

logger = logging.getLogger("ray.serve")


class _LocalMethod:
    def __init__(self, function: Callable, executor: SerialExecutor, extra_kwargs: dict):
        self._function = function
        self._executor = executor
        self._extra_kwargs = extra_kwargs

    def remote(self, *args, **kwargs):
        return self._executor.run(self._function, *args, **kwargs, **self._extra_kwargs)


class _LocalCall:
    def __init__(self, coroutine_function: Callable):
        self.remote = coroutine_function


class LocalDenoiserHandle:
    """The Denoiser in-process as its deployment runs it: `denoise` queues the job on the
    step loop and awaits it (requests awaited together batch), `load` answers at once."""

    def __init__(self, engine, on_step: Callable[[int, int], None] | None = None):
        self._engine = engine
        self.denoise = _LocalCall(lambda job: engine.denoise_async(job, on_step))
        self.load = _LocalCall(self._load)

    async def _load(self):
        return self._engine.load()


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


def usage_of(
    prompt: OptimizedPrompt,
    steps: StepDecision,
    encoding: Encoding,
    total_ms: float,
    job: DenoiseJob | None = None,
    reference_cached: bool | None = None,
) -> dict:
    """OpenAI Images `usage` shape, plus what we add (steps and why, truncation)."""
    deadline = steps.deadline_ms
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
        "steps_policy": steps.policy,
        "steps_complexity": steps.complexity,  # the complexity score behind the choice, 0..1
        "deadline_ms": deadline,
        "deadline_met": None if deadline is None else total_ms <= deadline,
        "predicted_ms": steps.predicted_ms,
        "elapsed_ms": round(total_ms, 1),  # ingress to images, as judged against the deadline
        # UNet steps run: num_inference_steps, or an edit's last strength x num_inference_steps
        "denoising_steps": job.steps_to_run if job is not None else steps.steps,
        "strength": job.strength if job is not None and job.init_image is not None else None,
        "reference_image_cached": reference_cached,  # edits with a reference: its embedding came from the cache
    }


class ImagePipeline:
    def __init__(
        self,
        prompt_optimizer,
        text_encoder,
        denoiser,
        vae_codec,
        step_controller: StepController,
        quality_guard: LiveQualityGuard | None = None,
        metrics=None,
        image_prompt_encoder=None,
    ):
        """`metrics`: a `PipelineMetrics` when served (Ray metrics), None in-process.
        `image_prompt_encoder`: whatever has `encode_image_prompt` (the TextEncoder
        deployment when served); default: `text_encoder`."""
        self.prompt_optimizer = prompt_optimizer
        self.text_encoder = text_encoder
        self.image_prompt_encoder = image_prompt_encoder or text_encoder
        self.denoiser = denoiser
        self.vae_codec = vae_codec
        self.step_controller = step_controller
        self.quality_guard = quality_guard or LiveQualityGuard()
        self.metrics = metrics
        self._shadows: set[asyncio.Task] = set()

    async def optimize_prompt(
        self, prompt: str, negative_prompt: str = "", cache_namespace: str = "default"
    ) -> OptimizedPrompt:
        return await self.prompt_optimizer.optimize.remote(prompt, negative_prompt, cache_namespace, True)

    async def generate(self, request: ImageRequest) -> GenerationResult:
        """A generation, or an edit when `request.image` is set (the same flow: the edit's
        image and reference are encoded while the prompt is)."""
        start = time.perf_counter()
        stage_ms: dict[str, float] = {}
        image_inputs = None
        if request.is_edit:
            image_inputs = asyncio.ensure_future(self._encode_edit_inputs(request, stage_ms))
        try:
            return await self._generate(request, start, stage_ms, image_inputs)
        finally:
            if image_inputs is not None and not image_inputs.done():
                image_inputs.cancel()

    async def _encode_edit_inputs(self, request: ImageRequest, stage_ms: dict[str, float]):
        """(EncodedEdit, the reference's ImagePromptEmbedding or None, image detail or None)."""

        async def reference():
            if request.reference_image is None:
                return None
            from deployments.text_encoder.image_prompt import image_hash

            with _timed(stage_ms, "reference"):
                key = await asyncio.to_thread(image_hash, request.reference_image)
                return await self.image_prompt_encoder.encode_image_prompt.remote(
                    request.reference_image, routing_key=key
                )

        async def image():
            with _timed(stage_ms, "encode_image"):
                return await self.vae_codec.encode_image.remote(
                    request.image, request.width, request.height, request.mask
                )

        async def detail():
            if request.num_inference_steps is not None:
                return None  # only the step controller's complexity score reads it
            import numpy as np

            from serve_app.flow.steps import image_detail

            return await asyncio.to_thread(lambda: image_detail(np.asarray(request.image)))

        encoded, embedding, image_detail_score = await asyncio.gather(image(), reference(), detail())
        return encoded, embedding, image_detail_score

    async def _generate(
        self, request: ImageRequest, start: float, stage_ms: dict[str, float], image_inputs: asyncio.Future | None
    ) -> GenerationResult:
        with _timed(stage_ms, "optimize"):
            prompt: OptimizedPrompt = await self.prompt_optimizer.optimize.remote(
                request.prompt, request.negative_prompt, request.cache_namespace, request.optimize_prompt
            )
        # One encoder call for both texts: [0] conditional, [1] unconditional / negative.
        with _timed(stage_ms, "encode"):
            encoding: Encoding = await self.text_encoder.encode.remote(
                [prompt.prompt, prompt.negative_prompt],
                namespace=prompt.cache_namespace,
                routing_key=prompt.routing_key,
            )
        embeddings = encoding.hidden
        edit = {}
        detail = embedding = None
        if image_inputs is not None:
            encoded, embedding, detail = await image_inputs
            edit = {
                "init_image": encoded.image,
                "mask": encoded.mask,
                "masked_image": encoded.masked_image,
                "strength": request.strength,
            }
            if embedding is not None:
                edit.update(
                    image_embeds=embedding.embeds, variant="ip_adapter", image_prompt_scale=request.reference_scale
                )
        steps = await self.choose_steps(request, prompt, start, stage_ms, detail)
        guard = self.quality_guard
        job = DenoiseJob(
            prompt_embeds=embeddings[0:1],
            negative_prompt_embeds=embeddings[1:2],
            height=request.height,
            width=request.width,
            seeds=request.seeds,
            num_inference_steps=steps.steps,
            guidance_scale=request.guidance_scale,
            variant="baseline" if guard.tripped else "production",
            early_stop=None if guard.tripped else self.step_controller.settings.early_stop_threshold,
            early_stop_min_steps=self.step_controller.range_for(request)[0],  # never below the tier's minimum
        )
        job = dataclasses.replace(job, **edit)
        with _timed(stage_ms, "denoise"):
            latents = await self.denoiser.denoise.remote(job)
        overlay = (request.image, request.mask) if request.mask is not None and request.keep_unmasked else None
        with _timed(stage_ms, "decode"):
            images = await self.vae_codec.decode_png.remote(latents, overlay)
        self.step_controller.observe_denoise(steps, stage_ms["denoise"])
        self.step_controller.observe_decode(stage_ms["decode"], request.n * request.width * request.height)
        total_ms = (time.perf_counter() - start) * 1000.0
        usage = usage_of(prompt, steps, encoding, total_ms, job, None if embedding is None else embedding.cache_hit)
        if self.metrics is not None:
            self.metrics.record_request(steps, usage["deadline_met"])
            if request.is_edit:
                reference = "none" if embedding is None else ("cached" if embedding.cache_hit else "new")
                self.metrics.record_edit("inpaint" if request.mask is not None else "img2img", reference)
        if job.variant != "ip_adapter" and guard.should_shadow():  # the baseline UNet has no image-prompt adapter
            task = asyncio.get_running_loop().create_task(self._shadow(job, images))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)
        return GenerationResult(images, request.seeds, prompt, steps, usage, stage_ms)

    async def choose_steps(
        self,
        request: ImageRequest,
        prompt: OptimizedPrompt,
        start: float,
        stage_ms: dict[str, float],
        detail: float | None = None,
    ) -> StepDecision:
        controller, guard = self.step_controller, self.quality_guard
        if guard.tripped and guard.settings.baseline_steps and request.num_inference_steps is None:
            return StepDecision(
                controller.at_least_one_step(guard.settings.baseline_steps, request), "quality-guard", "fixed"
            )
        load = None
        if controller.needs_load(request):  # the live cost per step and the queue ahead
            with _timed(stage_ms, "steps"):  # the step controller asks the denoiser its load
                load = await self.denoiser.load.remote()
        return controller.choose(request, prompt, load, (time.perf_counter() - start) * 1000.0, detail)

    async def _shadow(self, job: DenoiseJob, served_png: list[bytes]) -> None:
        """Render `job` again with the baseline, in the background, and judge the served images."""
        from serve_app.flow.quality import psnr_db

        steps = self.quality_guard.settings.baseline_steps or job.num_inference_steps
        baseline_job = dataclasses.replace(
            job, variant="baseline", background=True, num_inference_steps=steps, early_stop=None
        )
        try:
            baseline_png = await self.vae_codec.decode_png.remote(await self.denoiser.denoise.remote(baseline_job))
            for served, baseline in zip(served_png, baseline_png):
                self.quality_guard.record(await asyncio.to_thread(psnr_db, served, baseline))
        except Exception:  # a failed shadow must never touch the served path
            logger.exception("quality guard shadow render failed")
            return
        if self.metrics is not None:
            self.metrics.record_shadow(self.quality_guard)

    async def wait_for_shadows(self) -> None:
        """Tests and benchmarks: let the background renders finish."""
        while self._shadows:
            await asyncio.gather(*list(self._shadows), return_exceptions=True)


def local_pipeline(
    model_path: Path,
    num_threads: int | None = None,
    step_settings: dict | None = None,
    on_step: Callable[[int, int], None] | None = None,
    stage_threads: dict[str, int] | None = None,
    prompt_settings: dict | None = None,
    encoder_cache: dict | None = None,
    denoiser_settings: dict | None = None,
    quality_guard: dict | None = None,
    image_prompt_cache_entries: int | None = None,
) -> ImagePipeline:
    """All four engines in this process, no Ray. `stage_threads` overrides `num_threads`
    per stage, as AppSettings.stage_threads does for the served replicas."""
    stage_threads = stage_threads or {}
    from deployments.denoiser.engine import DenoiserEngine
    from deployments.prompt.optimizer import PromptOptimizerEngine
    from deployments.text_encoder.engine import TextEncoderEngine
    from deployments.text_encoder.image_prompt import LazyImagePromptEncoder
    from deployments.vae.codec import VaeCodecEngine

    return ImagePipeline(
        prompt_optimizer=LocalHandle(PromptOptimizerEngine(model_path, **(prompt_settings or {}))),
        text_encoder=LocalHandle(
            TextEncoderEngine(model_path, stage_threads.get("TextEncoder", num_threads), encoder_cache)
        ),
        denoiser=LocalDenoiserHandle(
            DenoiserEngine(model_path, stage_threads.get("Denoiser", num_threads), denoiser_settings), on_step
        ),
        vae_codec=LocalHandle(VaeCodecEngine(model_path, stage_threads.get("VaeCodec", num_threads))),
        step_controller=StepController(StepSettings.model_validate(step_settings or {})),
        quality_guard=LiveQualityGuard(QualityGuardSettings.model_validate(quality_guard or {})),
        image_prompt_encoder=LocalHandle(
            LazyImagePromptEncoder(
                model_path,
                stage_threads.get("TextEncoder", num_threads),
                **({"cache_entries": image_prompt_cache_entries} if image_prompt_cache_entries else {}),
            )
        ),
    )


def local_pipeline_for(model_path: Path, settings, on_step: Callable[[int, int], None] | None = None) -> ImagePipeline:
    """`local_pipeline` configured as the served application is (an `AppSettings`): same
    thread counts, so the same bytes; same prompt templates and encoder cache."""
    return local_pipeline(
        model_path,
        settings.num_threads,
        settings.steps.model_dump(),
        on_step=on_step,
        stage_threads=settings.stage_threads,
        prompt_settings=settings.prompt.model_dump(),
        encoder_cache=settings.text_encoder.cache.model_dump(),
        denoiser_settings=settings.denoiser.model_dump(),
        quality_guard=settings.quality_guard.model_dump(),
        image_prompt_cache_entries=settings.text_encoder.image_prompt_cache_entries,
    )
