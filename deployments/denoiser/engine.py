"""Stage 3: the UNet denoising loop with classifier-free guidance, step-level batched.

Each job carries its own scheduler instance and state, so jobs with different step
counts (and schedulers) share one UNet forward per step (`step_batcher`). A job alone
reproduces diffusers' StableDiffusionPipeline step for step, so images match it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deployments.common.vae_scale import latent_shape, vae_scale_factor
from deployments.denoiser.backends import AdapterUNet, FallbackUNet, OnnxAdapterUNet, ip_adapter_runner
from deployments.denoiser.deep_cache import check_cache_settings
from deployments.denoiser.edit_latents import ImageLatentDistribution, denoising_steps, edit_start, edit_timesteps
from deployments.denoiser.settings import DenoiserSettings
from deployments.denoiser.solvers import make_scheduler
from deployments.denoiser.step_batcher import (
    ActiveJob,
    FeatureCache,
    JobCancelled,
    LoadSnapshot,
    StepBatcher,
    UNetForward,
)
from deployments.denoiser.variant import UNetVariant, VariantKind
from deployments.models import loading
from deployments.vae.previewer import model_previewer, preview_pngs

__all__ = [
    "DenoiseJob",
    "DenoiseUpdate",
    "DenoiserEngine",
    "DenoiserSettings",
    "JobCancelled",
    "LoadSnapshot",
    "UNetVariant",
    "VariantKind",
]


@dataclass
class DenoiseJob:
    prompt_embeds: torch.Tensor  # [1, 77, hidden]
    negative_prompt_embeds: torch.Tensor  # [1, 77, hidden]
    height: int
    width: int
    seeds: list[int]  # one image per seed
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None = None  # a solver of solvers.SOLVERS or a diffusers class name; None: the model's own
    # the UNet that runs it: the served one, the quality guard's full-precision baseline, or the
    # image-prompt adapter at a scale (UNetVariant.ip_adapter(scale), with `image_embeds`)
    variant: UNetVariant = field(default_factory=UNetVariant.production)
    background: bool = False  # a shadow render: runs only when no user job runs or waits
    early_stop: float | None = None  # convergence early stop threshold (None: run every step)
    early_stop_min_steps: int = 0
    # Edits (deployments/denoiser/edit_latents.py): start from this image's latents at
    # `strength`, keep it outside `mask` ([1, 1, H/8, W/8], 1 = repaint); `image_embeds`
    # ([1, dim]): the reference image's embedding for the image-prompt adapter's UNet.
    init_image: ImageLatentDistribution | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None
    masked_image: ImageLatentDistribution | None = None  # 9-channel inpainting UNets
    image_embeds: torch.Tensor | None = None
    # streaming: steps done (1-based, of steps_to_run) after which the predicted clean latent is sent
    preview_steps: tuple[int, ...] = ()
    # feature caching across steps (deep_cache.py): a whole UNet step every `cache_interval`
    # steps (1: every step), the others rerun only the branch `cache_branch_id` names
    cache_interval: int = 1
    cache_branch_id: int = 0

    @property
    def steps_to_run(self) -> int:
        """UNet steps this job takes: an edit runs only the last strength x steps."""
        if self.init_image is None:
            return self.num_inference_steps
        return denoising_steps(self.num_inference_steps, self.strength)


def preview_steps(steps: int, previews: int) -> tuple[int, ...]:
    """`previews` evenly spaced steps of a `steps`-step run, the last step excluded (the final
    image is not a preview); fewer when the run is too short to space them."""
    chosen = {round(steps * k / (previews + 1)) for k in range(1, previews + 1)}
    return tuple(sorted(step for step in chosen if 1 <= step < steps))


@dataclass(frozen=True)
class DenoiseUpdate:
    """What a streamed job sends: a preview (the predicted clean latents after `steps_done`
    steps) or, last, its final latents."""

    steps_done: int
    total_steps: int
    latents: torch.Tensor  # [images, 4, h, w], scaled as the VAE decodes them
    final: bool
    # a preview already decoded by the model's previewer (PNG per image); None: decode `latents`
    preview_png: list[bytes] | None = None


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, as diffusers seeds one per image: it draws the starting
    noise, then (stochastic schedulers: DDPM, Euler ancestral, ...) every step's noise, so an
    image depends on its seed alone — not on the global RNG or on the batch it ran in."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_latents(generator: torch.Generator, channels: int, height: int, width: int) -> torch.Tensor:
    """The starting noise for one image, as diffusers draws it."""
    return torch.randn((1, channels, *latent_shape(height, width)), generator=generator)


class DenoiserEngine:
    def __init__(
        self, model_path: Path, num_threads: int | None = None, settings: DenoiserSettings | dict | None = None
    ):
        self.num_threads = num_threads
        self.settings = DenoiserSettings.model_validate(settings or {})
        self.model_path = model_path = Path(model_path)
        vae_scale_factor(model_path)  # refuses a VAE whose latent grid is not the one sizes are checked for
        self.unet_config = loading.load_unet_config(model_path)
        # a 9-channel inpainting UNet takes 4 latent channels + the mask + the masked image's 4
        self.inpainting_unet = loading.is_inpainting_unet(self.unet_config)
        self.latent_channels = 4 if self.inpainting_unet else self.unet_config["in_channels"]
        self.scheduler_cls, self.scheduler_config = loading.load_scheduler_config(model_path)
        self.unet = FallbackUNet(model_path, self.settings.backends, num_threads)
        # Previews are decoded here when the model has a previewer (64K parameters, a few ms):
        # sending each preview's latents to the VaeCodec and back cost a hop each way
        # (benchmarks/streaming.py measured the difference).
        self.previewer = model_previewer(model_path)
        self._baseline_unet: FallbackUNet | None = None
        self._ip_adapter_unet: AdapterUNet | OnnxAdapterUNet | None = None
        self._ip_adapter_backend: object = None  # the production runner it was loaded beside
        self._ip_adapter_lock = threading.Lock()
        if self.settings.preload_ip_adapter and loading.has_image_prompt_adapter(model_path):
            # here, not on a background thread: from_pretrained patches torch.nn.Module globally
            # while it loads (accelerate's init_empty_weights), so a concurrent load elsewhere
            # in the process would get meta tensors
            self._load_ip_adapter()
        self.batcher = StepBatcher(
            self.unet_for,
            lambda: loading.set_torch_threads(self.num_threads),
            self.settings.max_batch_size,
            self.settings.admit_between_steps,
            self.feature_cache_for,
        )

    def unet_for(self, variant: UNetVariant) -> UNetForward:
        """The forward that runs `variant`'s jobs (the step loop asks at every step)."""
        if variant.kind is VariantKind.PRODUCTION:
            return self.unet
        if variant.kind is VariantKind.BASELINE:
            if self._baseline_unet is None:  # on the step loop's thread, when the first baseline job runs
                self._baseline_unet = FallbackUNet(self.model_path, self.settings.baseline_backends, self.num_threads)
            return self._baseline_unet
        scale = variant.adapter_scale
        if scale is None:
            raise ValueError(f"UNet variant {variant}: the image-prompt adapter needs a scale")
        self._load_ip_adapter()

        def forward(
            sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, image_embeds: torch.Tensor
        ) -> torch.Tensor:
            while True:
                runner = self._load_ip_adapter()
                try:
                    return runner(sample, timesteps, context, image_embeds, scale)
                except Exception as error:
                    # on the production backend's weights: its failure moves production on
                    # too, and the adapter follows it (a copy of its own fails alone)
                    if not runner.shared or not self.unet.fail_over(error):
                        raise

        return forward

    def feature_cache_for(self, variant: UNetVariant) -> FeatureCache | None:
        """`variant`'s feature caching across steps; None where its backend has none."""
        if variant.kind is VariantKind.PRODUCTION:
            return self.unet.feature_cache
        if variant.kind is VariantKind.BASELINE:
            return None if self._baseline_unet is None else self._baseline_unet.feature_cache
        assert variant.adapter_scale is not None, "UNetVariant checks the adapter's scale"
        return self._load_ip_adapter().feature_cache(variant.adapter_scale)

    def _load_ip_adapter(self) -> AdapterUNet | OnnxAdapterUNet:
        """The adapter UNet, loaded once: at start (preload) or by the step loop at the first
        reference job; again on the new production backend after a fallback, when it shared
        the old one's weights."""
        with self._ip_adapter_lock:
            adapter = self._ip_adapter_unet
            if adapter is None or (adapter.shared and self._ip_adapter_backend is not self.unet.runner):
                # on the production UNet's own weights where its backend allows (eager torch,
                # ONNX Runtime fp32's graph with the adapter in)
                adapter = ip_adapter_runner(self.model_path, self.unet.shareable_runner)
                self._ip_adapter_unet, self._ip_adapter_backend = adapter, self.unet.runner
            return adapter

    def new_scheduler(self, num_inference_steps: int, name: str | None = None) -> Any:
        return make_scheduler(name, self.scheduler_cls, self.scheduler_config, num_inference_steps)

    def prepare(self, job: DenoiseJob) -> ActiveJob:
        """The job's starting state: its scheduler, noise and text context."""
        count = len(job.seeds)
        scheduler = self.new_scheduler(job.num_inference_steps, job.scheduler)
        channels = self.latent_channels
        timesteps, inpaint, conditioning = scheduler.timesteps, None, None
        generators = image_generators(job.seeds)
        if job.init_image is not None:
            timesteps = edit_timesteps(scheduler, job.num_inference_steps, job.strength)
            latents, inpaint, conditioning = edit_start(
                scheduler, job.init_image, generators, timesteps, job.strength, job.mask, job.masked_image
            )
        else:
            latents = torch.cat([initial_latents(g, channels, job.height, job.width) for g in generators])
            latents = latents * scheduler.init_noise_sigma
        guided = job.guidance_scale > 1.0
        context = job.prompt_embeds.expand(count, -1, -1)
        if guided:
            context = torch.cat([job.negative_prompt_embeds.expand(count, -1, -1), context])
        image_embeds = None
        if job.image_embeds is not None:  # diffusers' prepare_ip_adapter_image_embeds: zeros for the unconditional half
            image_embeds = job.image_embeds[None].expand(count, -1, -1)
            if guided:
                image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
        early_stop = None if inpaint is not None else job.early_stop  # x0 would overwrite the kept region
        return ActiveJob(
            scheduler,
            latents,
            context,
            job.guidance_scale,
            timesteps,
            early_stop=early_stop,
            early_stop_min_steps=job.early_stop_min_steps,
            inpaint=inpaint,
            image_embeds=image_embeds,
            extra_channels=conditioning,
            generators=generators,
            preview_after=frozenset(job.preview_steps),
            cache_interval=job.cache_interval,
            cache_branch_id=job.cache_branch_id,
        )

    def submit(
        self,
        job: DenoiseJob,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: threading.Event | None = None,
        on_preview: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> Future:
        """Queue the job for the step loop; the future gets latents [len(seeds), 4, H/8, W/8].

        `cancelled` set from another thread stops it at the next step boundary (JobCancelled).
        `on_preview(done, total, x0)`: the predicted clean latents after each of `job.preview_steps`."""
        return self.batcher.submit(
            lambda: self.prepare(job),
            len(job.seeds),
            self._checked_latent_shape(job),
            job.steps_to_run,
            on_step,
            cancelled,
            job.variant,
            job.background,
            on_preview,
        )

    def _checked_latent_shape(self, job: DenoiseJob) -> tuple[int, int]:
        """The job's latent size, once the job is found to be one this model can run (ValueError if not)."""
        shape = latent_shape(job.height, job.width)
        if not isinstance(job.variant, UNetVariant):
            raise ValueError(f"unknown UNet variant {job.variant!r}: a UNetVariant runs a job")
        if job.init_image is not None:
            if not 0.0 < job.strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1], got {job.strength}")
            if job.steps_to_run < 1:
                raise ValueError(f"{job.num_inference_steps} steps at strength {job.strength} run no step")
            if tuple(job.init_image.mean.shape[-2:]) != shape:
                raise ValueError(f"the image's latents are {tuple(job.init_image.mean.shape[-2:])}, not {shape}")
        if self.inpainting_unet and (job.mask is None or job.masked_image is None):
            raise ValueError(
                "this model's UNet is an inpainting UNet (9 input channels): it serves only edits with a mask"
            )
        check_cache_settings(job.cache_interval, job.cache_branch_id, self.unet_config)
        if (job.image_embeds is not None) != job.variant.takes_image_embeds:
            raise ValueError("image_embeds go with the ip_adapter variant, and only with it")
        return shape

    async def denoise_async(self, job: DenoiseJob, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The job's latents, awaited: jobs awaited together batch; a cancelled await
        (client gone) makes the job leave the batch at the next step boundary."""
        cancelled = threading.Event()
        future = self.submit(job, on_step, cancelled)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancelled.set()
            self.batcher.wake()
            raise

    async def denoise_stream(
        self, job: DenoiseJob, on_step: Callable[[int, int], None] | None = None
    ) -> AsyncGenerator[DenoiseUpdate]:
        """The job's previews as its steps make them, then its final latents. Closing the
        iterator early (client gone) makes the job leave the batch at the next step boundary."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[DenoiseUpdate] = asyncio.Queue()

        def on_preview(done: int, total: int, x0: torch.Tensor) -> None:  # on the step loop's thread
            loop.call_soon_threadsafe(updates.put_nowait, DenoiseUpdate(done, total, x0, final=False))

        async def decoded(update: DenoiseUpdate) -> DenoiseUpdate:
            if self.previewer is None:
                return update
            pngs = await asyncio.to_thread(preview_pngs, self.previewer, update.latents)
            return dataclasses.replace(update, preview_png=pngs)

        cancelled = threading.Event()
        finished = asyncio.wrap_future(self.submit(job, on_step, cancelled, on_preview))
        try:
            while not finished.done() or not updates.empty():
                next_update = asyncio.ensure_future(updates.get())
                await asyncio.wait({next_update, finished}, return_when=asyncio.FIRST_COMPLETED)
                if next_update.done():
                    yield await decoded(next_update.result())
                else:  # previews are queued before the result is set, so none is left behind
                    next_update.cancel()
            latents = finished.result()
            yield DenoiseUpdate(job.steps_to_run, job.steps_to_run, latents, final=True)
        finally:
            if not finished.done():
                cancelled.set()
                self.batcher.wake()
                finished.cancel()

    def load(self) -> LoadSnapshot:
        return dataclasses.replace(
            self.batcher.snapshot(), backend=self.unet.active.name, backend_fallbacks=len(self.unet.fallbacks)
        )
