"""The request flow as plain async code over four stage handles.

A stage handle is anything with `handle.<method>.remote(*args)` returning an awaitable:
a Ray Serve `DeploymentHandle` when served, a `LocalHandle` around the engine in-process
(the CLI, tests and the in-process benchmark). The flow is the same code in both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deployments.common.serial_executor import SerialExecutor
from deployments.denoiser.edit_latents import EncodedEdit
from deployments.denoiser.engine import DenoiseJob, DenoiserEngine, DenoiseUpdate, preview_steps
from deployments.denoiser.step_batcher import LoadSnapshot
from deployments.denoiser.variant import UNetVariant
from deployments.models.portrait.adherence import PromptExpectations, expectations
from deployments.models.portrait.judge import Judge
from deployments.prompt.optimizer import OptimizedPrompt, PromptOptimizerEngine
from deployments.text_encoder.engine import Encoding, TextEncoderEngine
from deployments.text_encoder.image_prompt import ImagePromptEmbedding, LazyImagePromptEncoder, image_hash
from deployments.vae.codec import VaeCodecEngine
from serve_app.config import AppSettings, RetrySettings
from serve_app.flow.metrics import PipelineMetrics
from serve_app.flow.quality_guard import Adherence, LiveQualityGuard
from serve_app.flow.request import ImageRequest
from serve_app.flow.retry import RetryBudget, is_replica_failure, retry_deadline
from serve_app.flow.sampler_table import sampler_table_for
from serve_app.flow.steps import StepController, StepDecision, image_detail
from serve_app.flow.usage import Usage, usage_of

logger = logging.getLogger("ray.serve")


class _LocalMethod:
    def __init__(self, function: Callable[..., Any], executor: SerialExecutor):
        self._function = function
        self._executor = executor

    def remote(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self._executor.run(self._function, *args, **kwargs)


class _LocalCall:
    """`.remote(...)` of a local handle: a coroutine, or a stream (`_LocalStream`)."""

    def __init__(self, function: Callable[..., Awaitable[Any] | _LocalStream]):
        self.remote = function


class _LocalStream:
    """An engine's async generator as a DeploymentResponseGenerator looks: iterate, or cancel()."""

    def __init__(self, updates: AsyncIterator[Any]):
        self._updates = updates

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._updates

    def cancel(self) -> None:
        close = getattr(self._updates, "aclose", None)
        if close is not None:
            asyncio.ensure_future(close())


class LocalDenoiserHandle:
    """The Denoiser in-process as its deployment runs it: `denoise` queues the job on the
    step loop and awaits it (requests awaited together batch), `load` answers at once."""

    def __init__(self, engine: DenoiserEngine, on_step: Callable[[int, int], None] | None = None):
        self._engine = engine
        self.denoise = _LocalCall(lambda job: engine.denoise_async(job, on_step))
        self.denoise_stream = _LocalCall(lambda job: _LocalStream(engine.denoise_stream(job, on_step)))
        self.load = _LocalCall(self._load)

    def options(self, **_: Any) -> LocalDenoiserHandle:
        """As DeploymentHandle.options(stream=True): the local calls stream already."""
        return self

    async def _load(self) -> LoadSnapshot:
        return self._engine.load()


class LocalHandle:
    """DeploymentHandle look-alike over an in-process engine: calls run one at a time in
    arrival order on the engine's own thread, as one replica serves them."""

    def __init__(self, engine: Any):
        self._engine = engine
        self._executor = SerialExecutor(type(engine).__name__)

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._engine, name), self._executor)


@dataclass
class GenerationResult:
    images_png: list[bytes]
    seeds: list[int]
    prompt: OptimizedPrompt
    steps: StepDecision
    usage: Usage
    stage_ms: dict[str, float] = field(default_factory=dict)  # wall time per stage call, hop included


@dataclass
class DenoiseStarted:
    """A streamed request passed every stage before the denoiser (its answer can begin: what
    fails from here on fails mid-stream)."""

    steps: StepDecision


@dataclass
class PartialImages:
    """Previews of every image of a request: the predicted clean latents after `steps_done`
    of `total_steps` steps, decoded by the previewer."""

    index: int  # 0, 1, ... in the order they were made
    images_png: list[bytes]
    steps_done: int
    total_steps: int


StreamEvent = DenoiseStarted | PartialImages | GenerationResult


@dataclass
class EditEncoding:
    """What an edit's images become while its prompt is encoded."""

    latents: EncodedEdit  # the target's (and the masked target's) latents, the mask at latent size
    reference: ImagePromptEmbedding | None  # the reference face's embedding, if one was sent
    detail: float | None  # the target's edge density for the step controller; None when steps are given

    @property
    def reference_cached(self) -> bool | None:
        """Whether the reference's embedding came from the cache; None without a reference."""
        return None if self.reference is None else self.reference.cache_hit

    @property
    def reference_source(self) -> str:
        """For the edit metrics: none | cached | new."""
        if self.reference is None:
            return "none"
        return "cached" if self.reference.cache_hit else "new"


@contextmanager
def _timed(stage_ms: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    stage_ms[stage] = (time.perf_counter() - start) * 1000.0


class ImagePipeline:
    def __init__(
        self,
        prompt_optimizer: Any,
        text_encoder: Any,
        denoiser: Any,
        vae_codec: Any,
        step_controller: StepController,
        quality_guard: LiveQualityGuard | None = None,
        metrics: PipelineMetrics | None = None,
        image_prompt_encoder: Any = None,
        retry: RetrySettings | None = None,
    ):
        """The four stages are handles (a `DeploymentHandle` or a `LocalHandle`; served, each
        wrapped in a `RetryingHandle`). `metrics`: a `PipelineMetrics` when served (Ray
        metrics), None in-process. `image_prompt_encoder`: whatever has `encode_image_prompt`
        (the TextEncoder deployment when served); default: `text_encoder`. `retry`: how a
        streamed denoising whose replica died is started again (None: it is not)."""
        self.prompt_optimizer = prompt_optimizer
        self.text_encoder = text_encoder
        self.image_prompt_encoder = image_prompt_encoder or text_encoder
        self.denoiser = denoiser
        self.vae_codec = vae_codec
        self.step_controller = step_controller
        self.quality_guard = quality_guard or LiveQualityGuard()
        self.metrics = metrics
        self.retry = retry
        self._shadows: set[asyncio.Task] = set()
        self._judge: Judge | None = None  # the shadow comparisons' judge, loaded on the first one
        self._judge_lock = threading.Lock()  # shadows judge in worker threads: load it once

    async def optimize_prompt(
        self, prompt: str, negative_prompt: str = "", cache_namespace: str = "default"
    ) -> OptimizedPrompt:
        return await self.prompt_optimizer.optimize.remote(prompt, negative_prompt, cache_namespace, True)

    async def generate(self, request: ImageRequest) -> GenerationResult:
        """A generation, or an edit when `request.image` is set (the same flow: the edit's
        image and reference are encoded while the prompt is)."""
        async with aclosing(self.generate_stream(request)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    return event
        raise RuntimeError("the pipeline ended without a result")

    async def generate_stream(self, request: ImageRequest, partial_images: int = 0) -> AsyncGenerator[StreamEvent]:
        """`generate` as events: DenoiseStarted, then up to `partial_images` PartialImages
        (evenly spaced over the denoising steps; fewer when the run is short), then the
        GenerationResult. Closing it early cancels the request's denoising job."""
        start = time.perf_counter()
        stage_ms: dict[str, float] = {}
        # retries of this request's stage calls end by its deadline (retry.py); set before the
        # edit's encoding task starts, which copies the context
        retry_deadline.set(time.monotonic() + request.deadline_ms / 1000.0 if request.deadline_ms else None)
        edit_encoding = asyncio.ensure_future(self._encode_edit(request, stage_ms)) if request.is_edit else None
        try:
            prompt = await self._optimize(request, stage_ms)
            encoding = await self._encode_prompt(prompt, stage_ms)
            edit = await edit_encoding if edit_encoding is not None else None
            steps = await self.choose_steps(request, prompt, start, stage_ms, edit.detail if edit else None)
            job = self._denoise_job(request, encoding, steps, edit)
            job = dataclasses.replace(job, preview_steps=preview_steps(job.steps_to_run, partial_images))
            yield DenoiseStarted(steps)
            images: list[bytes] = []
            async with aclosing(self._render(request, job, stage_ms)) as rendered:
                async for event in rendered:
                    if isinstance(event, PartialImages):
                        yield event
                    else:
                        images = event
        finally:
            if edit_encoding is not None and not edit_encoding.done():
                edit_encoding.cancel()
        self._observe_timings(request, steps, stage_ms)
        total_ms = (time.perf_counter() - start) * 1000.0
        usage = usage_of(prompt, steps, encoding, total_ms, job, edit.reference_cached if edit else None)
        self._record(request, steps, usage, edit)
        self._maybe_shadow(job, images, prompt, request.prompt)
        yield GenerationResult(images, request.seeds, prompt, steps, usage, stage_ms)

    async def _optimize(self, request: ImageRequest, stage_ms: dict[str, float]) -> OptimizedPrompt:
        with _timed(stage_ms, "optimize"):
            return await self.prompt_optimizer.optimize.remote(
                request.prompt, request.negative_prompt, request.cache_namespace, request.optimize_prompt
            )

    async def _encode_prompt(self, prompt: OptimizedPrompt, stage_ms: dict[str, float]) -> Encoding:
        """One encoder call for both texts: [0] conditional, [1] unconditional / negative."""
        with _timed(stage_ms, "encode"):
            return await self.text_encoder.encode.remote(
                [prompt.prompt, prompt.negative_prompt],
                namespace=prompt.cache_namespace,
                routing_key=prompt.routing_key,
            )

    async def _encode_edit(self, request: ImageRequest, stage_ms: dict[str, float]) -> EditEncoding:
        """The target's latents, the reference's embedding and the target's detail, concurrently."""

        async def reference() -> ImagePromptEmbedding | None:
            if request.reference_image is None or request.reference_scale == 0:
                return None  # at scale 0 the adapter adds nothing: the plain edit, on the production UNet
            with _timed(stage_ms, "reference"):
                key = await asyncio.to_thread(image_hash, request.reference_image)
                return await self.image_prompt_encoder.encode_image_prompt.remote(
                    request.reference_image, routing_key=key
                )

        async def latents() -> EncodedEdit:
            with _timed(stage_ms, "encode_image"):
                return await self.vae_codec.encode_image.remote(
                    request.image, request.width, request.height, request.mask
                )

        async def detail() -> float | None:
            if request.num_inference_steps is not None:
                return None  # only the step controller's complexity score reads it
            return await asyncio.to_thread(lambda: image_detail(np.asarray(request.image)))

        encoded, embedding, image_detail_score = await asyncio.gather(latents(), reference(), detail())
        return EditEncoding(encoded, embedding, image_detail_score)

    def _denoise_job(
        self, request: ImageRequest, encoding: Encoding, steps: StepDecision, edit: EditEncoding | None
    ) -> DenoiseJob:
        guard = self.quality_guard
        job = DenoiseJob(
            prompt_embeds=encoding.hidden[0:1],
            negative_prompt_embeds=encoding.hidden[1:2],
            height=request.height,
            width=request.width,
            seeds=request.seeds,
            num_inference_steps=steps.steps,
            guidance_scale=request.guidance_scale,
            scheduler=steps.scheduler,
            cache_interval=steps.cache_interval,
            cache_branch_id=steps.cache_branch_id,
            variant=UNetVariant.baseline() if guard.tripped else UNetVariant.production(),
            early_stop=None if guard.tripped else self.step_controller.settings.early_stop_threshold,
            early_stop_min_steps=self.step_controller.range_for(request)[0],  # never below the tier's minimum
        )
        if edit is None:
            return job
        job = dataclasses.replace(
            job,
            init_image=edit.latents.image,
            mask=edit.latents.mask,
            masked_image=edit.latents.masked_image,
            strength=request.strength,
        )
        if edit.reference is None:
            return job
        return dataclasses.replace(
            job, image_embeds=edit.reference.embeds, variant=UNetVariant.ip_adapter(request.reference_scale)
        )

    async def _render(
        self, request: ImageRequest, job: DenoiseJob, stage_ms: dict[str, float]
    ) -> AsyncGenerator[PartialImages | list[bytes]]:
        """Denoise (with the job's previews decoded as they come), then decode to PNGs (an
        inpaint's unmasked pixels pasted back if asked): the PartialImages, then the PNGs."""
        with _timed(stage_ms, "denoise"):
            if job.preview_steps:
                latents, index = None, 0
                async with aclosing(self._denoise_stream(job)) as updates:
                    async for update in updates:
                        if update.final:
                            latents = update.latents
                            break
                        yield await self._preview(index, update, stage_ms)
                        index += 1
            else:
                latents = await self.denoiser.denoise.remote(job)
        if "preview" in stage_ms:  # the denoiser went on while previews were decoded
            stage_ms["denoise"] -= stage_ms["preview"]
        if latents is None:
            raise RuntimeError("the denoiser's stream ended without final latents")
        overlay = (request.image, request.mask) if request.mask is not None and request.keep_unmasked else None
        with _timed(stage_ms, "decode"):
            yield await self.vae_codec.decode_png.remote(latents, overlay)

    async def _denoise_stream(self, job: DenoiseJob) -> AsyncGenerator[DenoiseUpdate]:
        """The denoiser's updates; closed before the end (client gone), it cancels the job.
        If the replica dies mid-stream, the job starts again (the same seeds make the same
        latents) and the previews already sent are not sent twice."""
        sent, budget = 0, None
        while True:
            updates = self.denoiser.options(stream=True).denoise_stream.remote(job)
            finished, seen = False, 0
            try:
                async for update in updates:
                    finished = update.final
                    if finished:
                        yield update
                        return
                    seen += 1
                    if seen > sent:
                        sent = seen
                        yield update
            except Exception as error:
                if self.retry is None or not is_replica_failure(error):
                    raise
                budget = budget or RetryBudget(self.retry, "Denoiser")
                await budget.wait_or_give_up(error)
            finally:
                if not finished:
                    updates.cancel()

    async def _preview(self, index: int, update: DenoiseUpdate, stage_ms: dict[str, float]) -> PartialImages:
        """The update's partial images: decoded by the denoiser already when the model has a
        previewer, else by the VaeCodec."""
        images = update.preview_png
        if images is None:
            start = time.perf_counter()
            images = await self.vae_codec.preview_png.remote(update.latents)
            stage_ms["preview"] = stage_ms.get("preview", 0.0) + (time.perf_counter() - start) * 1000.0
        return PartialImages(index, images, update.steps_done, update.total_steps)

    def _observe_timings(self, request: ImageRequest, steps: StepDecision, stage_ms: dict[str, float]) -> None:
        """The step controller calibrates its cost model on what this request took."""
        self.step_controller.observe_denoise(steps, stage_ms["denoise"])
        self.step_controller.observe_decode(stage_ms["decode"], request.n * request.width * request.height)

    def _record(self, request: ImageRequest, steps: StepDecision, usage: Usage, edit: EditEncoding | None) -> None:
        if self.metrics is None:
            return
        self.metrics.record_request(steps, usage.deadline_met)
        if edit is not None:
            self.metrics.record_edit("inpaint" if request.mask is not None else "img2img", edit.reference_source)

    def _maybe_shadow(self, job: DenoiseJob, images: list[bytes], prompt: OptimizedPrompt, asked_text: str) -> None:
        """A share of requests is rendered again by the baseline in the background (the quality guard).
        What the judge looks for: the optimizer's attributes and `asked_text` (the request's prompt),
        read as `fusionserve ab-test` reads them."""
        if not job.variant.takes_image_embeds and self.quality_guard.should_shadow():  # the baseline has no adapter
            asked = expectations(prompt.attributes, asked_text)
            task = asyncio.get_running_loop().create_task(self._shadow(job, images, asked))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

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
            steps = controller.at_least_one_step(guard.settings.baseline_steps, request)
            reason = "quality-guard"
            return StepDecision(steps, reason, "fixed", scheduler=request.scheduler, sampler_reason=reason)
        load = None
        if controller.needs_load(request):  # the live cost per step and the queue ahead
            with _timed(stage_ms, "steps"):  # the step controller asks the denoiser its load
                load = await self.denoiser.load.remote()
        decision = controller.choose(request, prompt, load, (time.perf_counter() - start) * 1000.0, detail)
        if guard.tripped:  # the speed-ups are off: every step runs the whole (baseline) UNet
            decision = dataclasses.replace(decision, cache_interval=1, sampler_reason="quality-guard")
        return decision

    async def _shadow(self, job: DenoiseJob, served_png: list[bytes], asked: PromptExpectations) -> None:
        """Render `job` again with the baseline, in the background, and judge the served images."""
        from serve_app.flow.quality import psnr_db

        steps = self.quality_guard.settings.baseline_steps or job.num_inference_steps
        baseline_job = dataclasses.replace(
            job,
            variant=UNetVariant.baseline(),
            background=True,
            num_inference_steps=steps,
            early_stop=None,
            cache_interval=1,  # the reference picture: every step whole
        )
        try:
            baseline_png = await self.vae_codec.decode_png.remote(await self.denoiser.denoise.remote(baseline_job))
            for served, baseline in zip(served_png, baseline_png):
                psnr = await asyncio.to_thread(psnr_db, served, baseline)
                adherence = (
                    await asyncio.to_thread(self._adherence, asked, served, baseline) if asked.expected else None
                )
                self.quality_guard.record(psnr, adherence)
        except Exception:  # a failed shadow must never touch the served path
            logger.exception("quality guard shadow render failed")
            return
        if self.metrics is not None:
            self.metrics.record_shadow(self.quality_guard)

    def _adherence(self, asked: PromptExpectations, served_png: bytes, baseline_png: bytes) -> Adherence:
        """The judge reads both images (blocking: run it in a thread); `asked` must expect something."""
        readings = self._loaded_judge().read([_png_image(served_png), _png_image(baseline_png)])
        # `asked` expects something, so neither share is None
        served, baseline = (asked.adherence(reading) or 0.0 for reading in readings)
        return Adherence(served, baseline)

    def _loaded_judge(self) -> Judge:
        with self._judge_lock:
            if self._judge is None:
                self._judge = Judge.packaged()
            return self._judge

    async def wait_for_shadows(self) -> None:
        """Tests and benchmarks: let the background renders finish."""
        while self._shadows:
            await asyncio.gather(*list(self._shadows), return_exceptions=True)


def _png_image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def local_pipeline_for(
    model_path: Path, settings: AppSettings | None = None, on_step: Callable[[int, int], None] | None = None
) -> ImagePipeline:
    """All four engines in this process, no Ray, configured as the served application is
    (same thread counts, so the same bytes; same prompt templates and encoder cache).
    `on_step(done, total)`: the denoiser's progress."""
    settings = settings or AppSettings()
    text_encoder_threads = settings.threads_for("TextEncoder")
    return ImagePipeline(
        prompt_optimizer=LocalHandle(
            PromptOptimizerEngine(model_path, settings.prompt.templates, settings.prompt.default_style)
        ),
        text_encoder=LocalHandle(TextEncoderEngine(model_path, text_encoder_threads, settings.text_encoder.cache)),
        denoiser=LocalDenoiserHandle(
            DenoiserEngine(model_path, settings.threads_for("Denoiser"), settings.denoiser), on_step
        ),
        vae_codec=LocalHandle(VaeCodecEngine(model_path, settings.threads_for("VaeCodec"))),
        step_controller=StepController(settings.steps, sampler_table_for(settings.steps.sampler_table, model_path)),
        quality_guard=LiveQualityGuard(settings.quality_guard),
        image_prompt_encoder=LocalHandle(
            LazyImagePromptEncoder(model_path, text_encoder_threads, settings.text_encoder.image_prompt_cache_entries)
        ),
    )
