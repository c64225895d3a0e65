"""Stage 4: latents <-> images (decode to PNG; encode targets and masks for edits).

codec (VaeCodecEngine) and deployment (Ray only). May import deployments.models,
deployments.common and deployments.denoiser.edit_latents (the edit's latent types)."""
