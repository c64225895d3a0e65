"""Stage 4: latents -> pixels -> PNG bytes; and for edits, image (and mask) -> latents.

Pre- and post-processing are diffusers' own `VaeImageProcessor` settings, so an edit's
starting latents are the ones diffusers' Img2Img / Inpaint pipelines compute."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deployments.common.images import encode_png, to_uint8
from deployments.common.vae_scale import vae_scale_factor
from deployments.denoiser.edit_latents import EncodedEdit, ImageLatentDistribution, latent_mask
from deployments.models import loading
from deployments.vae.previewer import model_previewer


class VaeCodecEngine:
    def __init__(self, model_path: Path, num_threads: int | None = None, previewer: str = "auto"):
        """`previewer`: what decodes partial images: "auto" (the model's trained previewer when
        its folder has one, else the VAE) or "vae"."""
        from diffusers.image_processor import VaeImageProcessor

        self.num_threads = num_threads
        self.vae = loading.load_vae(Path(model_path))
        self.scaling_factor = self.vae.config.scaling_factor
        scale = vae_scale_factor(Path(model_path))
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self._lock = threading.Lock()
        if previewer not in ("auto", "vae"):
            raise ValueError(f"previewer must be 'auto' or 'vae', got {previewer!r}")
        self.previewer = model_previewer(Path(model_path)) if previewer == "auto" else None
        # a 9-channel (inpainting) UNet also takes the masked image's latents
        self.inpainting_unet = loading.is_inpainting_unet(loading.load_unet_config(Path(model_path)))

    def _distribution(self, pixels: torch.Tensor) -> ImageLatentDistribution:
        with self._lock:
            loading.set_torch_threads(self.num_threads)
            distribution = self.vae.encode(pixels).latent_dist
        return ImageLatentDistribution(distribution.mean.clone(), distribution.std.clone(), self.scaling_factor)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image, width: int, height: int, mask: Image.Image | None = None) -> EncodedEdit:
        """An RGB image resized to width x height -> its latent distribution; a mask (L, white
        = repaint) -> binarised on the latent grid [1, 1, h, w]."""
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        encoded = EncodedEdit(self._distribution(pixels))
        if mask is None:
            return encoded
        mask_pixels = self.mask_processor.preprocess(mask, height=height, width=width)
        height_latent, width_latent = encoded.image.mean.shape[-2:]
        encoded.mask = latent_mask(mask_pixels, (height_latent, width_latent))
        if self.inpainting_unet:  # diffusers: init_image * (mask_condition < 0.5)
            encoded.masked_image = self._distribution(pixels * (mask_pixels < 0.5))
        return encoded

    @torch.inference_mode()
    def decode_pixels(self, latents: torch.Tensor) -> np.ndarray:
        with self._lock:
            loading.set_torch_threads(self.num_threads)
            decoded = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return to_uint8(decoded)

    @torch.inference_mode()
    def preview_pixels(self, latents: torch.Tensor) -> np.ndarray:
        """Predicted clean latents -> NHWC uint8, by the previewer (the VAE without one)."""
        if self.previewer is None:
            return self.decode_pixels(latents)
        with self._lock:
            loading.set_torch_threads(self.num_threads)
            return to_uint8(self.previewer(latents.float()))

    def preview_png(self, latents: torch.Tensor) -> list[bytes]:
        """Partial images of a streamed request (fast PNG compression: they are seen once)."""
        return [encode_png(image, compress_level=1) for image in self.preview_pixels(latents)]

    def decode_png(self, latents: torch.Tensor, overlay: tuple[Image.Image, Image.Image] | None = None) -> list[bytes]:
        """`overlay` (image, mask; white = repainted): outside the mask, the image's own
        pixels are pasted back (diffusers' `apply_overlay`): the VAE decoder's group norms
        and attention are global, so latent blending alone moves every pixel a little."""
        pixels = self.decode_pixels(latents)
        if overlay is None:
            return [encode_png(image) for image in pixels]
        target, mask = overlay
        size = (pixels.shape[2], pixels.shape[1])
        target = target if target.size == size else target.resize(size, Image.Resampling.LANCZOS)
        mask = mask if mask.size == size else mask.resize(size, Image.Resampling.LANCZOS)
        return [
            encode_png(np.asarray(self.image_processor.apply_overlay(mask, target, Image.fromarray(image))))
            for image in pixels
        ]
