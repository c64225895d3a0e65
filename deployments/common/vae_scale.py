"""The VAE scale factor: image pixels per latent cell along each side.

A model's own factor comes from its VAE config (`vae_scale_factor`, diffusers' rule: every
down block but the last halves the image). Every model this project serves (the SD 1.x
family, the embedded ones included) has 8: the ingress checks request sizes against
`VAE_SCALE_FACTOR` before any model folder is at hand, so the stages refuse a model whose
VAE has another factor rather than serve sizes the ingress never checked.
"""

from __future__ import annotations

import json
from pathlib import Path

VAE_SCALE_FACTOR = 8


def vae_scale_factor(model_path: Path) -> int:
    """The factor of the model folder's VAE (`vae/config.json`), checked against VAE_SCALE_FACTOR."""
    config = json.loads((Path(model_path) / "vae" / "config.json").read_text())
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if factor != VAE_SCALE_FACTOR:
        raise ValueError(
            f"{model_path}: the VAE scales images by {factor}, but the served sizes are multiples of "
            f"{VAE_SCALE_FACTOR} (SD 1.x VAEs)"
        )
    return factor


def latent_shape(height: int, width: int) -> tuple[int, int]:
    """The latent grid (h, w) of a height x width image; sides must be multiples of the factor."""
    if height % VAE_SCALE_FACTOR or width % VAE_SCALE_FACTOR:
        raise ValueError(f"height and width must be multiples of {VAE_SCALE_FACTOR}")
    return height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR
