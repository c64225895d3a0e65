"""Training the portrait model on renders made on the fly: the VAE first, then the text encoder
and the UNet together. Each phase checkpoints atomically and resumes exactly.

Every batch, and every random draw of a step (crops, noise, timesteps, the VAE's posterior
sample), is a pure function of (seed, phase, step), so a run cut off anywhere and resumed ends
with the same weights as an uninterrupted one. The random starting weights come from the
preset (configs/models/portrait.yaml) built by the model builder with its fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from deployments.models.portrait.captions import caption
from deployments.models.portrait.held_out import training_attributes
from deployments.models.portrait.renderer import render_portrait
from deployments.models.portrait.training_loop import Phase, run_phase

PRESET = "portrait-init"  # the architecture and random starting weights
IMAGE_SIZE = 128


@dataclass(frozen=True)
class PortraitTrainingConfig:
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_crop: int = 64  # the VAE is fully convolutional: crops train the same weights, 4x cheaper
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    diffusion_steps: int = 12000
    diffusion_batch: int = 32
    diffusion_learning_rate: float = 4e-4
    seed: int = 0
    checkpoint_every: int = 250
    threads: int = 1  # torch threads of the trainer; one data worker renders beside it
    workers: int = 1


# -- data -----------------------------------------------------------------------------------------


def _images(count: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """`count` renders in [-1, 1] (N, 3, 128, 128) and a random caption of each."""
    import numpy as np

    attributes = [training_attributes(rng) for _ in range(count)]
    arrays = [np.asarray(render_portrait(a, rng.randrange(2**31), IMAGE_SIZE), np.float32) for a in attributes]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, [caption(a, rng) for a in attributes]


def vae_batch(config: PortraitTrainingConfig, step: int) -> torch.Tensor:
    rng = random.Random(f"portrait-vae:{config.seed}:{step}")
    images, _ = _images(config.vae_batch, rng)
    crops = []
    for image in images:
        x, y = rng.randrange(IMAGE_SIZE - config.vae_crop + 1), rng.randrange(IMAGE_SIZE - config.vae_crop + 1)
        crops.append(image[:, y : y + config.vae_crop, x : x + config.vae_crop])
    return torch.stack(crops)


def diffusion_batch(config: PortraitTrainingConfig, step: int) -> tuple[torch.Tensor, list[str]]:
    return _images(config.diffusion_batch, random.Random(f"portrait-diffusion:{config.seed}:{step}"))


class _Batches(IterableDataset):
    def __init__(
        self, make: Callable[[PortraitTrainingConfig, int], Any], config: PortraitTrainingConfig, start: int, end: int
    ):
        self.make, self.config, self.start, self.end = make, config, start, end

    def __iter__(self) -> Iterator[Any]:
        for step in range(self.start, self.end):
            yield self.make(self.config, step)


def _step_generator(config: PortraitTrainingConfig, phase: str, step: int) -> torch.Generator:
    """The random draws of one step, a pure function of (seed, phase, step)."""
    digest = hashlib.sha256(f"{config.seed}:{phase}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


# -- phases ---------------------------------------------------------------------------------------


def _phase(name: str, modules: dict[str, nn.Module], learning_rate: float, steps: int) -> Phase:
    parameters = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)
    warmup = max(1, min(200, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )  # linear warm-up, then cosine decay to 0
    return Phase(name, modules, optimizer, schedule, steps)


def _loader(
    make: Callable[[PortraitTrainingConfig, int], Any], config: PortraitTrainingConfig, start: int, end: int
) -> DataLoader:
    return DataLoader(
        _Batches(make, config, start, end),
        batch_size=None,
        num_workers=config.workers,
        prefetch_factor=2 if config.workers else None,
    )


@dataclass
class PortraitComponents:
    """The diffusers parts being trained (loaded from the preset's random-weight folder)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    scheduler: Any


def load_components(model_dir: Path) -> PortraitComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return PortraitComponents(
        vae=AutoencoderKL.from_pretrained(model_dir / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(model_dir / "unet"),
        scheduler=DDPMScheduler.from_pretrained(model_dir / "scheduler"),
    )


def train_vae(
    parts: PortraitComponents,
    config: PortraitTrainingConfig,
    directory: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> Phase:
    vae = parts.vae
    phase = _phase("vae", {"vae": vae}, config.vae_learning_rate, config.vae_steps)
    phase.restore(directory)
    end = config.vae_steps if stop_after is None else min(config.vae_steps, phase.step + stop_after)

    def loss_of(images: torch.Tensor, step: int) -> torch.Tensor:
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator=_step_generator(config, "vae", step))
        reconstruction = vae.decode(latents).sample
        rec = nn.functional.l1_loss(reconstruction, images) + nn.functional.mse_loss(reconstruction, images)
        return rec + config.vae_kl_weight * posterior.kl().mean()

    if phase.step < end:
        run_phase(
            phase,
            _loader(vae_batch, config, phase.step, end),
            loss_of,
            directory,
            checkpoint_every=config.checkpoint_every,
            end=end,
            progress=progress,
        )
    return phase


@torch.no_grad()
def latent_scale(vae: Any, config: PortraitTrainingConfig, batches: int = 8) -> float:
    """1 / std of the trained encoder's latents (SD's scaling_factor), on renders training never saw."""
    samples = [vae.encode(diffusion_batch(config, -1 - i)[0]).latent_dist.mean for i in range(batches)]
    return float(1.0 / torch.cat(samples).std())


def train_diffusion(
    parts: PortraitComponents,
    config: PortraitTrainingConfig,
    directory: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> Phase:
    """Text encoder and UNet together, v-prediction on the preset's (zero terminal SNR) schedule,
    the VAE frozen."""
    vae, unet, text_encoder, tokenizer, scheduler = (
        parts.vae,
        parts.unet,
        parts.text_encoder,
        parts.tokenizer,
        parts.scheduler,
    )
    vae.requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    phase = _phase(
        "diffusion",
        {"unet": unet, "text_encoder": text_encoder},
        config.diffusion_learning_rate,
        config.diffusion_steps,
    )
    phase.restore(directory)
    end = config.diffusion_steps if stop_after is None else min(config.diffusion_steps, phase.step + stop_after)

    def loss_of(batch: tuple[torch.Tensor, list[str]], step: int) -> torch.Tensor:
        images, captions = batch
        generator = _step_generator(config, "diffusion", step)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=generator) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        tokens = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        context = text_encoder(tokens)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        return nn.functional.mse_loss(prediction, target)

    if phase.step < end:
        run_phase(
            phase,
            _loader(diffusion_batch, config, phase.step, end),
            loss_of,
            directory,
            checkpoint_every=config.checkpoint_every,
            end=end,
            progress=progress,
        )
    return phase


def train_portrait_model(config: PortraitTrainingConfig, work: Path, output: Path, *, progress: bool = True) -> Path:
    """The whole recipe, resumable at any point: build the random starting folder (once), train
    the VAE, set its latent scale, train text encoder + UNet, save a diffusers folder (fp16
    weights) at `output`."""
    from deployments.models.builder import build_model

    torch.set_num_threads(config.threads)
    start = work / "init"
    if not (start / "model_index.json").exists():
        build_model(PRESET, start)
    parts = load_components(start)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    train_vae(parts, config, work, progress=progress)
    timings["vae_s"] = time.perf_counter() - began
    parts.vae.register_to_config(scaling_factor=latent_scale(parts.vae, config))
    began = time.perf_counter()
    train_diffusion(parts, config, work, progress=progress)
    timings["diffusion_s"] = time.perf_counter() - began
    save_model(parts, start, output)
    (work / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return output


def save_model(parts: PortraitComponents, start: Path, output: Path) -> None:
    """A diffusers folder like any checkpoint: the trained parts in fp16, the preset's scheduler."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae.half(),
        text_encoder=parts.text_encoder.half(),
        tokenizer=parts.tokenizer,
        unet=parts.unet.half(),
        scheduler=DDIMScheduler.from_pretrained(start / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if output.exists():
        shutil.rmtree(output)
    pipe.save_pretrained(output, safe_serialization=True)  # type: ignore[attr-defined]  # untyped mixin
    for part in (parts.vae, parts.text_encoder, parts.unet):
        part.float()
