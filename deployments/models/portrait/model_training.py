"""Training the portrait model: the VAE on renders made on the fly, then the text encoder and
the UNet together on a pool of encoded renders; then the same two again as refine stages (the
VAE with an edge-weighted loss, the UNet on a pool it encodes anew); the UNet for longer on
that pool, then with its loss weighted up on the face, then also on the face's small features
(glasses, mouth and brows, facial hair); last, the live-preview decoder against
the final VAE. Each phase checkpoints atomically and resumes exactly.

Every batch, and every random draw of a step (crops, noise, timesteps, the VAE's posterior
sample), is a pure function of (seed, phase, step), so a run cut off anywhere and resumed ends
with the same weights as an uninterrupted one. The random starting weights come from the
preset (configs/models/portrait.yaml) built by the model builder with its fixed seed.
"""

from __future__ import annotations

import dataclasses
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
from deployments.models.portrait.caption_heads import CaptionHeads, named_captions
from deployments.models.portrait.captions import caption
from deployments.models.portrait.held_out import training_attributes
from deployments.models.portrait.renderer import render_portrait
from deployments.models.portrait.training_loop import Phase, run_phase
from deployments.vae.previewer import PREVIEWER_FOLDER, LatentPreviewer
from deployments.vae.previewer_training import PreviewerTrainingConfig, train_previewer

PRESET = "portrait-init"  # the architecture and random starting weights
IMAGE_SIZE = 128


@dataclass(frozen=True)
class PortraitTrainingConfig:
    vae_steps: int = 1800
    vae_batch: int = 16
    vae_crop: int = 64  # the VAE is fully convolutional: crops train the same weights, 4x cheaper
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    # A second VAE stage weights each pixel's error by the render's edge strength there: eyes,
    # mouths and glasses are a few pixels of a 128x128 image, so a plain mean error lets the
    # first stage blur them away (they were missing from its reconstructions).
    vae_refine_steps: int = 2400
    vae_refine_learning_rate: float = 3e-4
    vae_detail_weight: float = 8.0
    diffusion_steps: int = 5000
    diffusion_batch: int = 32
    diffusion_learning_rate: float = 4e-4
    # The diffusion model continued on the refined VAE's latents (a new pool).
    diffusion_refine_steps: int = 1500
    diffusion_refine_learning_rate: float = 2e-4
    # Then on the same pool for longer: the refine stage's loss was still falling when it ended
    # and generated adherence was far below what the VAE keeps (35% vs 74%).
    diffusion_long_steps: int = 4000
    diffusion_long_learning_rate: float = 2e-4
    # Then with the loss weighted up on the face: after the long stage the attributes drawn at
    # chance (view, expression, glasses) were the ones a few latent cells of the face show, while
    # the large ones (background, hair colour) were right; the face box (judge.FACE_BOX, a third
    # of the latent) counts 1 + diffusion_face_weight times as much as the rest.
    diffusion_face_steps: int = 3000
    diffusion_face_learning_rate: float = 2e-4
    diffusion_face_weight: float = 2.0
    # Then with the loss weighted up where the face's small features are drawn (glasses,
    # expression, facial hair: regions.fine_feature_region, per render): after the face stage
    # the UNet's prediction did not depend on the glasses or expression words at all (a
    # diffusion classifier picked the caption's value at chance), though the latents show them.
    # A latent cell's weight gains diffusion_feature_weight x (the share of its pixels they
    # change), on top of the face box's weight.
    # The committed weights ran 2,000 steps on a 2,000-step schedule, then were resumed with it
    # stretched to 4,000 (README): held-out adherence at 20 steps 53.2% -> 58.7%.
    diffusion_feature_steps: int = 4000
    diffusion_feature_learning_rate: float = 2e-4
    diffusion_feature_weight: float = 8.0
    # ...and the text encoder asked to name every attribute of fully named captions from its
    # pooled state (caption_heads.py), this much beside the diffusion loss: trained from
    # scratch, it had let the expression words fade to nothing.
    diffusion_feature_text_weight: float = 0.1
    # The live-preview decoder (deployments/vae/previewer.py), trained against the final VAE on
    # the first `previewer_targets` latents of the last pool.
    previewer_steps: int = 1500
    previewer_targets: int = 2048
    # The image-prompt adapter (adapter_training.py), trained last on the finished model; 0: none.
    adapter_steps: int = 4000
    adapter_batch: int = 32
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
class PoolBatch:
    """One diffusion step's data: scaled latents, a caption of each, and their rows in the pool."""

    latents: torch.Tensor
    captions: list[str]
    rows: torch.Tensor


@dataclass(frozen=True)
class LatentPool:
    """Encoded renders: the VAE posterior of each (mean, std; unscaled) and its attributes; for
    the feature-weighted stage, the share of each latent cell the face's small features change."""

    mean: torch.Tensor  # (N, 4, 16, 16)
    std: torch.Tensor
    attributes: list[PortraitAttributes]
    feature_cells: torch.Tensor | None = None  # (N, 16, 16) in [0, 1]

    def batch(self, config: PortraitTrainingConfig, step: int, scale: float) -> PoolBatch:
        """Step `step`'s latents (a posterior draw, scaled) and a fresh caption of each."""
        rng = random.Random(f"portrait-diffusion:{config.seed}:{step}")
        rows = [rng.randrange(len(self.attributes)) for _ in range(config.diffusion_batch)]
        captions = [caption(self.attributes[i], rng) for i in rows]
        index = torch.tensor(rows)
        noise = torch.randn(self.mean[index].shape, generator=_step_generator(config, "posterior", step))
        return PoolBatch((self.mean[index] + self.std[index] * noise) * scale, captions, index)


@torch.no_grad()
def build_latent_pool(
    vae: Any, config: PortraitTrainingConfig, directory: Path, *, folder: str = "latent_pool", progress: bool = True
) -> LatentPool:
    """Encode `pool_size` renders in chunks saved under directory/folder as they finish (a
    cut-off build resumes at the next chunk); chunk k is a pure function of (seed, k) and the VAE."""
    path_of = directory / folder
    path_of.mkdir(parents=True, exist_ok=True)
    means, stds, attributes = [], [], []
    for k in tqdm(range(_pool_chunks(config)), desc=folder.replace("_", " "), disable=not progress):
        path = path_of / f"chunk_{k:04d}.pt"
        if not path.exists():
            _encode_chunk(vae, config, k, path)
        saved = torch.load(path, weights_only=True)
        means.append(saved["mean"])
        stds.append(saved["std"])
        attributes += [_attributes_of(json.loads(text)) for text in saved["attributes"]]
    return LatentPool(torch.cat(means), torch.cat(stds), attributes)


def _pool_chunks(config: PortraitTrainingConfig) -> int:
    return -(-config.pool_size // config.pool_chunk)


def _pool_chunk_portraits(config: PortraitTrainingConfig, k: int) -> tuple[list[PortraitAttributes], list[int]]:
    """Chunk k's renders: their attributes and seeds."""
    rng = random.Random(f"portrait-pool:{config.seed}:{k}")
    count = min(config.pool_chunk, config.pool_size - k * config.pool_chunk)
    chunk_attributes = [training_attributes(rng) for _ in range(count)]
    return chunk_attributes, [rng.randrange(2**31) for _ in chunk_attributes]


def _encode_chunk(vae: Any, config: PortraitTrainingConfig, k: int, path: Path) -> None:
    chunk_attributes, seeds = _pool_chunk_portraits(config, k)
    count = len(chunk_attributes)
    images = _render(chunk_attributes, seeds)
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


FEATURE_CELLS = "feature_cells"


def build_feature_cells(config: PortraitTrainingConfig, directory: Path, *, progress: bool = True) -> torch.Tensor:
    """(pool_size, 16, 16): per pool render, the share of each latent cell's pixels in its
    fine-feature region (regions.fine_feature_region), from the renders drawn again at their
    seeds; saved per chunk under directory/feature_cells (a cut-off build resumes)."""
    import numpy as np

    from deployments.models.portrait.regions import fine_feature_region, latent_cell_shares

    folder = directory / FEATURE_CELLS
    folder.mkdir(parents=True, exist_ok=True)
    chunks = []
    for k in tqdm(range(_pool_chunks(config)), desc="feature cells", disable=not progress):
        path = folder / f"chunk_{k:04d}.pt"
        if not path.exists():
            shares = np.stack(
                [
                    latent_cell_shares(fine_feature_region(a, seed))
                    for a, seed in zip(*_pool_chunk_portraits(config, k), strict=True)
                ]
            )
            partial = path.with_suffix(".partial")
            torch.save(torch.from_numpy(shares).half(), partial)
            partial.replace(path)
        chunks.append(torch.load(path, weights_only=True).float())
    return torch.cat(chunks)


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


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The random draws of one step of a phase, a pure function of (seed, phase, step)."""
    digest = hashlib.sha256(f"{seed}:{phase}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _step_generator(config: PortraitTrainingConfig, phase: str, step: int) -> torch.Generator:
    return step_generator(config.seed, phase, step)


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


@dataclass(frozen=True)
class Stage:
    """One training stage: the name of its checkpoint and loss log, its steps, its peak learning
    rate (linear warm-up, cosine decay to 0), for the VAE the edge weight of its loss, for the
    diffusion model the extra weight of the face's latent cells and of its fine features' cells
    in its loss, and the weight of the caption heads' loss on the text encoder."""

    name: str
    steps: int
    learning_rate: float
    detail_weight: float = 0.0
    face_weight: float = 0.0
    feature_weight: float = 0.0
    text_weight: float = 0.0


def vae_stages(config: PortraitTrainingConfig) -> tuple[Stage, Stage]:
    return (
        Stage("vae", config.vae_steps, config.vae_learning_rate),
        Stage("vae_refine", config.vae_refine_steps, config.vae_refine_learning_rate, config.vae_detail_weight),
    )


def diffusion_stages(config: PortraitTrainingConfig) -> tuple[Stage, Stage, Stage, Stage, Stage]:
    """On the first pool; on the refined pool; longer on the refined pool; weighted on the face;
    weighted on the face's fine features too."""
    return (
        Stage("diffusion", config.diffusion_steps, config.diffusion_learning_rate),
        Stage("diffusion_refine", config.diffusion_refine_steps, config.diffusion_refine_learning_rate),
        Stage("diffusion_long", config.diffusion_long_steps, config.diffusion_long_learning_rate),
        Stage(
            "diffusion_face",
            config.diffusion_face_steps,
            config.diffusion_face_learning_rate,
            face_weight=config.diffusion_face_weight,
        ),
        Stage(
            "diffusion_features",
            config.diffusion_feature_steps,
            config.diffusion_feature_learning_rate,
            face_weight=config.diffusion_face_weight,
            feature_weight=config.diffusion_feature_weight,
            text_weight=config.diffusion_feature_text_weight,
        ),
    )


def latent_face_weight(face_weight: float, latent_size: int = IMAGE_SIZE // 8) -> torch.Tensor:
    """(1, 1, S, S): 1 + face_weight on the latent cells that overlap judge.FACE_BOX (where the
    face's features are drawn), 1 elsewhere."""
    from deployments.models.portrait.judge import FACE_BOX, JUDGE_SIZE

    cell = JUDGE_SIZE / latent_size
    left, top, right, bottom = FACE_BOX
    weight = torch.ones(1, 1, latent_size, latent_size)
    rows = slice(int(top // cell), math.ceil(bottom / cell))
    columns = slice(int(left // cell), math.ceil(right / cell))
    weight[:, :, rows, columns] += face_weight
    return weight


def edge_strength(images: torch.Tensor) -> torch.Tensor:
    """Per pixel (N, 1, H, W): the Sobel gradient magnitude of the images' channel mean, in [0, ~1]."""
    gray = images.mean(dim=1, keepdim=True)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 8
    padded = nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = nn.functional.conv2d(padded, sobel_x)
    gy = nn.functional.conv2d(padded, sobel_x.transpose(2, 3))
    return torch.sqrt(gx * gx + gy * gy)


def train_vae(
    parts: PortraitComponents,
    config: PortraitTrainingConfig,
    directory: Path,
    *,
    stage: Stage | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> Phase:
    """One VAE stage (the first by default), starting from its checkpoint or else from the
    weights `parts.vae` has now."""
    stage = stage or vae_stages(config)[0]
    vae = parts.vae
    phase = _phase(stage.name, {"vae": vae}, stage.learning_rate, stage.steps)
    phase.restore(directory)
    end = stage.steps if stop_after is None else min(stage.steps, phase.step + stop_after)

    def loss_of(images: torch.Tensor, step: int) -> torch.Tensor:
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator=_step_generator(config, stage.name, step))
        reconstruction = vae.decode(latents).sample
        weight = 1.0 + stage.detail_weight * edge_strength(images)
        error = reconstruction - images
        rec = (weight * (error.abs() + error * error)).mean()
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
    stage: Stage | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> Phase:
    """One stage (the first by default) of the text encoder and UNet together, v-prediction on
    the preset's (zero terminal SNR) schedule, from the latent pool (the VAE's scaling_factor
    applied); it starts from its checkpoint or else from the weights the parts have now."""
    stage = stage or diffusion_stages(config)[0]
    unet, text_encoder, tokenizer, scheduler = parts.unet, parts.text_encoder, parts.tokenizer, parts.scheduler
    scale = float(parts.vae.config.scaling_factor)
    modules: dict[str, nn.Module] = {"unet": unet, "text_encoder": text_encoder}
    heads: CaptionHeads | None = None
    if stage.text_weight:
        with torch.random.fork_rng():  # the heads' starting weights, fixed by the seed
            torch.manual_seed(config.seed)
            heads = modules["caption_heads"] = CaptionHeads(text_encoder.config.hidden_size)
    phase = _phase(stage.name, modules, stage.learning_rate, stage.steps)
    phase.restore(directory)
    end = stage.steps if stop_after is None else min(stage.steps, phase.step + stop_after)
    face = latent_face_weight(stage.face_weight) if stage.face_weight else None
    if stage.feature_weight and pool.feature_cells is None:
        raise ValueError(f"stage {stage.name} weights fine features: the pool needs its feature_cells")

    def weight_of(batch: PoolBatch) -> torch.Tensor | None:
        if not stage.feature_weight:
            return face
        assert pool.feature_cells is not None
        features = stage.feature_weight * pool.feature_cells[batch.rows].unsqueeze(1)
        return (face if face is not None else 1.0) + features

    def tokens_of(captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def caption_loss(heads: CaptionHeads, step: int) -> torch.Tensor:
        rng = random.Random(f"portrait-captions:{config.seed}:{stage.name}:{step}")
        named = named_captions(rng, config.diffusion_batch)
        pooled = text_encoder(tokens_of([c.text for c in named]))[1]
        return heads.loss(pooled, named)

    def loss_of(batch: PoolBatch, step: int) -> torch.Tensor:
        diffusion = diffusion_loss(batch, step)
        return diffusion if heads is None else diffusion + stage.text_weight * caption_loss(heads, step)

    def diffusion_loss(batch: PoolBatch, step: int) -> torch.Tensor:
        latents, captions = batch.latents, batch.captions
        weight = weight_of(batch)
        generator = _step_generator(config, stage.name, step)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        context = text_encoder(tokens_of(captions))[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        if weight is None:
            return nn.functional.mse_loss(prediction, target)
        return (weight * (prediction - target) ** 2).mean() / weight.mean()  # the plain loss's scale

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


REFINED_POOL = "latent_pool_refined"


def train_portrait_model(config: PortraitTrainingConfig, work: Path, output: Path, *, progress: bool = True) -> Path:
    """The whole recipe, resumable at any point: build the random starting folder (once); train
    the VAE, encode the pool, set the latent scale, train text encoder + UNet; then the refine
    stages in the same order on the edge-weighted VAE and a pool it encodes again; save a
    diffusers folder (fp16 weights) at `output`; train the image-prompt adapter on it. (The order
    is the order the committed model was trained in: the refine stages came after its first run
    showed faces without features.)"""
    from deployments.models.builder import build_model

    torch.set_num_threads(config.threads)
    start = work / "init"
    if not (start / "model_index.json").exists():
        build_model(PRESET, start)
    parts = load_components(start)
    timings: dict[str, float] = {}
    pool: LatentPool | None = None
    for vae_stage, diffusion_stage, folder in zip(
        vae_stages(config), diffusion_stages(config)[:2], ("latent_pool", REFINED_POOL), strict=True
    ):
        if vae_stage.steps == 0 and diffusion_stage.steps == 0:
            continue  # a stage pair switched off (e.g. no refine stages)
        began = time.perf_counter()
        if vae_stage.steps:
            parts.vae.requires_grad_(True)
            train_vae(parts, config, work, stage=vae_stage, progress=progress)
        timings[f"{vae_stage.name}_s"] = time.perf_counter() - began
        began = time.perf_counter()
        parts.vae.requires_grad_(False)
        pool = build_latent_pool(parts.vae, config, work, folder=folder, progress=progress)
        parts.vae.register_to_config(scaling_factor=latent_scale(pool))
        timings[f"{folder}_s"] = time.perf_counter() - began
        began = time.perf_counter()
        if diffusion_stage.steps:
            train_diffusion(parts, pool, config, work, stage=diffusion_stage, progress=progress)
        timings[f"{diffusion_stage.name}_s"] = time.perf_counter() - began
    if pool is None:
        raise ValueError("no training stage has steps: set vae_steps or diffusion_steps above 0")
    for later_stage in diffusion_stages(config)[2:]:  # on the refined pool, after its first stage
        if later_stage.steps:
            began = time.perf_counter()
            if later_stage.feature_weight and pool.feature_cells is None:
                pool = dataclasses.replace(pool, feature_cells=build_feature_cells(config, work, progress=progress))
            train_diffusion(parts, pool, config, work, stage=later_stage, progress=progress)
            timings[f"{later_stage.name}_s"] = time.perf_counter() - began
    began = time.perf_counter()
    previewer = train_model_previewer(parts, pool, config, work, progress=progress)
    timings["previewer_s"] = time.perf_counter() - began
    save_model(parts, start, output)
    previewer.save(output / PREVIEWER_FOLDER)
    if config.adapter_steps:
        began = time.perf_counter()
        train_model_adapter(config, pool, work, output, progress=progress)
        timings["adapter_s"] = time.perf_counter() - began
    (work / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return output


def train_model_previewer(
    parts: PortraitComponents, pool: LatentPool, config: PortraitTrainingConfig, work: Path, *, progress: bool = True
) -> LatentPreviewer:
    """The live-preview decoder of the model's (final) VAE, on latents of its pool."""
    latents = pool.mean[: config.previewer_targets] * float(parts.vae.config.scaling_factor)
    training = PreviewerTrainingConfig(steps=config.previewer_steps, seed=config.seed)
    return train_previewer(parts.vae, latents, training, work, progress=progress)


def train_model_adapter(
    config: PortraitTrainingConfig, pool: LatentPool, work: Path, output: Path, *, progress: bool = True
) -> None:
    """The image-prompt adapter of the saved model in `output`, written into it."""
    from deployments.models.portrait.adapter_training import AdapterTrainingConfig, train_adapter

    adapter = AdapterTrainingConfig(
        steps=config.adapter_steps,
        batch=config.adapter_batch,
        seed=config.seed,
        checkpoint_every=config.checkpoint_every,
        threads=config.threads,
        workers=config.workers,
    )
    train_adapter(output, pool, adapter, work, output, progress=progress)


def export_model(config: PortraitTrainingConfig, work: Path, output: Path) -> Path:
    """The model as the checkpoints in `work` have it now (mid-run too) as a diffusers folder:
    to look at a run while it trains, or to save a run that was stopped early."""
    start = work / "init"
    parts = load_components(start)
    refined = (work / f"{vae_stages(config)[1].name}_checkpoint.pt").exists()
    for vae_stage in vae_stages(config):
        _phase(vae_stage.name, {"vae": parts.vae}, 1.0, max(1, vae_stage.steps)).restore(work)
    for stage in diffusion_stages(config):
        modules = {"unet": parts.unet, "text_encoder": parts.text_encoder}
        _phase(stage.name, modules, 1.0, max(1, stage.steps)).restore(work)
    folder = REFINED_POOL if refined else "latent_pool"
    pool = build_latent_pool(parts.vae, config, work, folder=folder, progress=False)
    parts.vae.register_to_config(scaling_factor=latent_scale(pool))
    save_model(parts, start, output)  # without the previewer: it is trained on the final VAE
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
