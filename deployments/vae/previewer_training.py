"""Training the live-preview decoder (previewer.py) against a model's VAE: the VAE decodes a
set of latents once (the targets, saved so a cut-off run does not decode them again), then the
previewer learns to map each latent to its decode. Checkpointed and resumable like every
training here (the portrait recipe runs it as its last stage)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deployments.models.portrait.training_loop import Phase, run_phase
from deployments.vae.previewer import LatentPreviewer, PreviewerConfig


@dataclass(frozen=True)
class PreviewerTrainingConfig:
    steps: int = 1500
    batch: int = 16
    learning_rate: float = 2e-3
    checkpoint_every: int = 250
    seed: int = 0


@torch.no_grad()
def decoded_targets(vae: Any, latents: torch.Tensor, path: Path, *, progress: bool = True) -> torch.Tensor:
    """The VAE's decodes of `latents` (scaled, as the denoiser makes them), in [-1, 1]; saved at
    `path` once made."""
    if path.exists():
        return torch.load(path, weights_only=True)
    scale = float(vae.config.scaling_factor)
    decodes = [
        vae.decode(latents[i : i + 32] / scale).sample.clamp(-1, 1).half()
        for i in tqdm(range(0, len(latents), 32), desc="previewer targets", disable=not progress)
    ]
    targets = torch.cat(decodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(targets, partial)
    partial.replace(path)
    return targets


def _rows(config: PreviewerTrainingConfig, step: int, count: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{config.seed}:previewer:{step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randint(0, count, (config.batch,), generator=generator)


def train_previewer(
    vae: Any,
    latents: torch.Tensor,
    config: PreviewerTrainingConfig,
    directory: Path,
    *,
    previewer_config: PreviewerConfig | None = None,
    progress: bool = True,
) -> LatentPreviewer:
    """A previewer for `vae`, trained on `latents` (scaled) and their decodes."""
    targets = decoded_targets(vae, latents, directory / "previewer_targets.pt", progress=progress)
    with torch.random.fork_rng():  # the starting weights, a function of the seed alone
        torch.manual_seed(config.seed)
        previewer = LatentPreviewer(previewer_config or PreviewerConfig(latent_channels=latents.shape[1]))
    optimizer = torch.optim.AdamW(previewer.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    phase = Phase("previewer", {"previewer": previewer}, optimizer, schedule, config.steps)
    phase.restore(directory)

    def loss_of(rows: torch.Tensor, step: int) -> torch.Tensor:
        error = previewer(latents[rows]) - targets[rows].float()
        return error.abs().mean() + (error * error).mean()

    if phase.step < config.steps:
        run_phase(
            phase,
            (_rows(config, step, len(latents)) for step in range(phase.step, config.steps)),
            loss_of,
            directory,
            checkpoint_every=config.checkpoint_every,
            end=config.steps,
            progress=progress,
            clip_grad_norm=None,
        )
    return previewer.eval()
