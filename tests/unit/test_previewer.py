"""The live-preview decoder: trained against a VAE it comes nearer that VAE's decodes than it
started, it survives a save and load, and the VAE codec serves previews with it when the
model folder has one (and with the VAE when not, or when asked)."""

from __future__ import annotations

import shutil

import torch

from deployments.models import loading
from deployments.vae.codec import VaeCodecEngine
from deployments.vae.previewer import PREVIEWER_FOLDER, LatentPreviewer, PreviewerConfig, psnr_db
from deployments.vae.previewer_training import PreviewerTrainingConfig, decoded_targets, train_previewer

SMALL = PreviewerConfig(widths=(16, 8, 8, 8))


def latents_of(vae, count: int) -> torch.Tensor:
    """Scaled latents of smooth random pictures (what a decoder has to learn is the VAE's map)."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear")
    with torch.no_grad():
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def test_training_brings_the_previewer_nearer_the_vae_and_it_survives_save_and_load(tiny_model_path, tmp_path):
    vae = loading.load_vae(tiny_model_path)
    latents = latents_of(vae, 64)
    targets = decoded_targets(vae, latents, tmp_path / "targets.pt", progress=False).float()
    torch.manual_seed(0)
    untrained = LatentPreviewer(SMALL)
    with torch.no_grad():
        before = psnr_db(untrained(latents), targets)
    config = PreviewerTrainingConfig(steps=120, batch=16, learning_rate=3e-3, checkpoint_every=60)
    previewer = train_previewer(vae, latents, config, tmp_path, previewer_config=SMALL, progress=False)
    with torch.no_grad():
        after = psnr_db(previewer(latents), targets)
    assert after > before + 2, (before, after)  # seeded
    previewer.save(tmp_path / "saved")
    loaded = LatentPreviewer.load(tmp_path / "saved")
    with torch.no_grad():
        assert psnr_db(loaded(latents), previewer(latents)) > 40  # fp16 weights on disk


def test_the_codec_previews_with_the_folders_previewer(tiny_model_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    without = VaeCodecEngine(model)
    assert without.previewer is None
    assert (without.preview_pixels(latents) == without.decode_pixels(latents)).all()  # the VAE itself
    LatentPreviewer(SMALL).save(model / PREVIEWER_FOLDER)
    engine = VaeCodecEngine(model)
    assert engine.previewer is not None
    previews = engine.preview_pixels(latents)
    assert previews.shape == (2, 64, 64, 3)
    assert (previews != engine.decode_pixels(latents)).any()
    assert VaeCodecEngine(model, previewer="vae").previewer is None
