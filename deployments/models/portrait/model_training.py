"""Training the portrait model: the VAE on renders made on the fly, then the text encoder and
the UNet together on a pool of encoded renders. Each phase checkpoints atomically and resumes
exactly.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from deployments.models.portrait.attributes import PortraitAttributes
from deployments.models.portrait.captions import caption
from deployments.models.portrait.held_out import training_attributes
from deployments.models.portrait.renderer import render_portrait
from deployments.models.portrait.training_loop import Phase, run_phase

PRESET = "portrait-init"  # the architecture and random starting weights
IMAGE_SIZE = 128


@dataclass(frozen=True)
class PortraitTrainingConfig:
    vae_steps: int = 1800
    vae_batch: int = 16
    vae_crop: int = 64  # the VAE is fully convolutional: crops train the same weights, 4x cheaper
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    diffusion_steps: int = 5000
    diffusion_batch: int = 32
    diffusion_learning_rate: float = 4e-4
    # Renders encoded once and sampled from (each with a fresh caption and posterior draw): a
    # VAE encode of 32 images costs as much as a UNet training step (0.85 s vs 0.72 s).
    pool_size: int = 16384
    pool_chunk: int = 1024
    seed: int = 0
    checkpoint_every: int = 250
    threads: int = 2  # torch threads of the trainer; rendering for the VAE takes ~5% of a core
    workers: int = 1


# -- data -----------------------------------------------------------------------------------------


def _render(attributes: list[PortraitAttributes], seeds: list[int]) -> torch.Tensor:
    """Renders in [-1, 1], (N, 3, 128, 128)."""
    import numpy as np

    arrays = [np.asarray(render_portrait(a, seed, IMAGE_SIZE), np.float32) for a, seed in zip(attributes, seeds)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def vae_batch(config: PortraitTrainingConfig, step: int) -> torch.Tensor:
    rng = random.Random(f"portrait-vae:{config.seed}:{step}")
    attributes = [training_attributes(rng) for _ in range(config.vae_batch)]
    images = _render(attributes, [rng.randrange(2**31) for _ in attributes])
    crops = []
    for image in images:
        x, y = rng.randrange(IMAGE_SIZE - config.vae_crop + 1), rng.randrange(IMAGE_SIZE - config.vae_crop + 1)
        crops.append(image[:, y : y + config.vae_crop, x : x + config.vae_crop])
    return torch.stack(crops)


@dataclass(frozen=True)
class LatentPool:
    """Encoded renders: the VAE posterior of each (mean, std; unscaled) and its attributes."""

    mean: torch.Tensor  # (N, 4, 16, 16)
    std: torch.Tensor
    attributes: list[PortraitAttributes]

    def batch(self, config: PortraitTrainingConfig, step: int, scale: float) -> tuple[torch.Tensor, list[str]]:
        """Step `step`'s latents (a posterior draw, scaled) and a fresh caption of each."""
        rng = random.Random(f"portrait-diffusion:{config.seed}:{step}")
        rows = [rng.randrange(len(self.attributes)) for _ in range(config.diffusion_batch)]
        captions = [caption(self.attributes[i], rng) for i in rows]
        index = torch.tensor(rows)
        noise = torch.randn(self.mean[index].shape, generator=_step_generator(config, "posterior", step))
        return (self.mean[index] + self.std[index] * noise) * scale, captions


@torch.no_grad()
def build_latent_pool(
    vae: Any, config: PortraitTrainingConfig, directory: Path, *, progress: bool = True
) -> LatentPool:
    """Encode `pool_size` renders in chunks saved as they finish (a cut-off build resumes at the
    next chunk); chunk k is a pure function of (seed, k)."""
    folder = directory / "latent_pool"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = -(-config.pool_size // config.pool_chunk)
    means, stds, attributes = [], [], []
    for k in tqdm(range(chunks), desc="latent pool", disable=not progress):
        path = folder / f"chunk_{k:04d}.pt"
        if not path.exists():
            _encode_chunk(vae, config, k, path)
        saved = torch.load(path, weights_only=True)
        means.append(saved["mean"])
        stds.append(saved["std"])
        attributes += [_attributes_of(json.loads(text)) for text in saved["attributes"]]
    return LatentPool(torch.cat(means), torch.cat(stds), attributes)


def _encode_chunk(vae: Any, config: PortraitTrainingConfig, k: int, path: Path) -> None:
    rng = random.Random(f"portrait-pool:{config.seed}:{k}")
    count = min(config.pool_chunk, config.pool_size - k * config.pool_chunk)
    chunk_attributes = [training_attributes(rng) for _ in range(count)]
    images = _render(chunk_attributes, [rng.randrange(2**31) for _ in chunk_attributes])
    posteriors = [vae.encode(images[i : i + 64]).latent_dist for i in range(0, count, 64)]
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "mean": torch.cat([p.mean for p in posteriors]),
            "std": torch.cat([p.std for p in posteriors]),
            "attributes": [json.dumps(_attribute_dict(a)) for a in chunk_attributes],
        },
        partial,
    )
    partial.replace(path)  # atomic: a cut-off build never leaves half a chunk


def _attribute_dict(attributes: PortraitAttributes) -> dict[str, Any]:
    values = asdict(attributes)
    values["accessories"] = sorted(attributes.accessories)
    return values


def _attributes_of(values: dict[str, Any]) -> PortraitAttributes:
    return PortraitAttributes(**{**values, "accessories": frozenset(values["accessories"])})


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


def latent_scale(pool: LatentPool) -> float:
    """1 / std of the encoder's latents over the pool (SD's scaling_factor)."""
    return float(1.0 / pool.mean.std())


def train_diffusion(
    parts: PortraitComponents,
    pool: LatentPool,
    config: PortraitTrainingConfig,
    directory: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> Phase:
    """Text encoder and UNet together, v-prediction on the preset's (zero terminal SNR) schedule,
    from the latent pool (the VAE's scaling_factor applied)."""
    unet, text_encoder, tokenizer, scheduler = parts.unet, parts.text_encoder, parts.tokenizer, parts.scheduler
    scale = float(parts.vae.config.scaling_factor)
    phase = _phase(
        "diffusion",
        {"unet": unet, "text_encoder": text_encoder},
        config.diffusion_learning_rate,
        config.diffusion_steps,
    )
    phase.restore(directory)
    end = config.diffusion_steps if stop_after is None else min(config.diffusion_steps, phase.step + stop_after)

    def loss_of(batch: tuple[torch.Tensor, list[str]], step: int) -> torch.Tensor:
        latents, captions = batch
        generator = _step_generator(config, "diffusion", step)
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
            (pool.batch(config, step, scale) for step in range(phase.step, end)),
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
    began = time.perf_counter()
    parts.vae.requires_grad_(False)
    pool = build_latent_pool(parts.vae, config, work, progress=progress)
    parts.vae.register_to_config(scaling_factor=latent_scale(pool))
    timings["latent_pool_s"] = time.perf_counter() - began
    began = time.perf_counter()
    train_diffusion(parts, pool, config, work, progress=progress)
    timings["diffusion_s"] = time.perf_counter() - began
    save_model(parts, start, output)
    (work / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return output


def export_model(config: PortraitTrainingConfig, work: Path, output: Path) -> Path:
    """The model as the checkpoints in `work` have it now (mid-run too) as a diffusers folder:
    to look at a run while it trains, or to save a run that was stopped early."""
    start = work / "init"
    parts = load_components(start)
    for phase in (
        _phase("vae", {"vae": parts.vae}, config.vae_learning_rate, config.vae_steps),
        _phase("diffusion", {"unet": parts.unet, "text_encoder": parts.text_encoder}, 1.0, config.diffusion_steps),
    ):
        phase.restore(work)
    pool = build_latent_pool(parts.vae, config, work, progress=False)
    parts.vae.register_to_config(scaling_factor=latent_scale(pool))
    save_model(parts, start, output)
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
