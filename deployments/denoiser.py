"""Stage 3: the UNet denoising loop with classifier-free guidance.

Each job carries its own scheduler instance, so jobs with different step counts can run
on one replica; step-level continuous batching is a later issue and lands here. The loop
reproduces diffusers' StableDiffusionPipeline step for step, so images match it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deployments import models

VAE_SCALE = 8  # SD 1.x VAEs downscale 8x; latents are (4, H/8, W/8)


class JobCancelled(Exception):
    """The caller went away; the job stopped at a step boundary."""


@dataclass
class DenoiseJob:
    prompt_embeds: torch.Tensor  # [1, 77, hidden]
    negative_prompt_embeds: torch.Tensor  # [1, 77, hidden]
    height: int
    width: int
    seeds: list[int]  # one image per seed
    num_inference_steps: int
    guidance_scale: float


def initial_latents(seed: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The starting noise for one image, as diffusers draws it with a CPU generator."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, channels, height // VAE_SCALE, width // VAE_SCALE), generator=generator)


class DenoiserEngine:
    def __init__(self, model_path: Path, num_threads: int | None = None):
        self.num_threads = num_threads
        model_path = Path(model_path)
        self.unet = models.load_unet(model_path)
        self.scheduler_cls, self.scheduler_config = models.load_scheduler_config(model_path)
        self._lock = threading.Lock()

    def new_scheduler(self, num_inference_steps: int):
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    @torch.inference_mode()
    def denoise(
        self,
        job: DenoiseJob,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> torch.Tensor:
        """Run the whole loop for one job; returns latents [len(seeds), 4, H/8, W/8].

        `cancelled` set from another thread stops the loop at the next step boundary.
        """
        count = len(job.seeds)
        scheduler = self.new_scheduler(job.num_inference_steps)
        channels = self.unet.config.in_channels
        latents = torch.cat([initial_latents(s, channels, job.height, job.width) for s in job.seeds])
        latents = latents * scheduler.init_noise_sigma

        guided = job.guidance_scale > 1.0  # diffusers skips the unconditional half at <= 1
        context = job.prompt_embeds.expand(count, -1, -1)
        if guided:
            context = torch.cat([job.negative_prompt_embeds.expand(count, -1, -1), context])

        timesteps = scheduler.timesteps
        with self._lock:
            models.set_torch_threads(self.num_threads)
            for index, t in enumerate(timesteps):
                if cancelled is not None and cancelled.is_set():
                    raise JobCancelled()
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = scheduler.scale_model_input(model_input, t)
                noise = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
                if guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + job.guidance_scale * (cond - uncond)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(index + 1, len(timesteps))
        return latents


def build_deployment():
    import asyncio

    from ray import serve

    from deployments.serial_executor import SerialExecutor

    @serve.deployment(name="Denoiser", ray_actor_options={"num_cpus": 1})
    class Denoiser:
        def __init__(self, model_path: str, num_threads: int | None = None):
            self.engine = DenoiserEngine(Path(model_path), num_threads)
            self.executor = SerialExecutor("denoiser")

        async def denoise(self, job: DenoiseJob) -> torch.Tensor:
            cancelled = threading.Event()
            try:
                return await self.executor.run(self.engine.denoise, job, None, cancelled)
            except asyncio.CancelledError:
                cancelled.set()  # client gone: the worker thread stops at the next step boundary
                raise

    return Denoiser
