"""Image-to-image and inpainting arithmetic, as diffusers' Img2Img / Inpaint pipelines do it.

An edit starts from the target image's latents instead of pure noise: with `strength` s
and N steps it runs only the last int(N x s) of the N timesteps, from the image's latents
noised to the first of them. With a mask (1 = repaint) the latents outside it are reset
after every step to the image's latents noised to the next timestep (diffusers' legacy
inpainting for 4-channel UNets), so only the masked region is generated.

The VAE encoder's output distribution (mean, std) does not depend on the seed: the
VaeCodec computes it once per request, and each image samples it with its own seed's
generator, then draws its noise from the same generator, in diffusers' order.

A 9-channel inpainting UNet (sd-v1-5-inpainting and kin) instead gets the mask and the
latents of the masked image (the target with the region to repaint blacked out) as 5 extra
input channels at every step, and no blending.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageLatentDistribution:
    """The VAE encoder's diagonal Gaussian for one image, [1, 4, h, w] each."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        # diffusers: DiagonalGaussianDistribution.sample, then `scaling_factor * latents`
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.scaling_factor * (self.mean + self.std * eps)


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """Steps an edit actually runs: diffusers' `get_timesteps` (0 means nothing to do)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def edit_timesteps(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The tail of the scheduler's timesteps an edit runs (and the scheduler told where it starts)."""
    start = num_inference_steps - denoising_steps(num_inference_steps, strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :]


@dataclass
class EncodedEdit:
    """What the VaeCodec makes of an edit's uploads."""

    image: ImageLatentDistribution
    mask: torch.Tensor | None = None  # [1, 1, h, w], 1 = repaint
    masked_image: ImageLatentDistribution | None = None  # for 9-channel inpainting UNets


@dataclass
class InpaintState:
    """What an inpainting job needs after every step to keep the unmasked region."""

    image_latents: torch.Tensor  # [images, 4, h, w]
    noise: torch.Tensor  # the noise the job started from
    mask: torch.Tensor  # [1, 1, h, w] (or per image), 1 = repaint

    def blend(self, scheduler, latents: torch.Tensor, next_timestep: torch.Tensor | None) -> torch.Tensor:
        """After a step: outside the mask, the image's latents at the next step's noise level
        (at the end, the clean latents themselves)."""
        known = self.image_latents
        if next_timestep is not None:
            known = scheduler.add_noise(known, self.noise, next_timestep.reshape(1))
        return (1 - self.mask) * known + self.mask * latents


def edit_start(
    scheduler,
    image: ImageLatentDistribution,
    generators: list[torch.Generator],
    timesteps: torch.Tensor,
    strength: float,
    inpaint_mask: torch.Tensor | None,
    masked_image: ImageLatentDistribution | None = None,
) -> tuple[torch.Tensor, InpaintState | None, torch.Tensor | None]:
    """Starting latents for an edit of `image`, one per image's generator (seeded by the caller,
    which keeps drawing from it for stochastic scheduler steps); the inpainting state when there
    is a mask (4-channel UNets); the extra input channels [images, 5, h, w] when there is a
    `masked_image` (9-channel UNets). Img2Img noises the image to the first timestep;
    inpainting at strength 1 starts from pure noise (diffusers' `is_strength_max`)."""
    strength_max = inpaint_mask is not None and strength == 1.0
    # diffusers encodes the image only when it needs it: always for 4-channel inpainting
    # (the blending), for 9-channel only below strength 1; the draws must follow its order
    sample_image = masked_image is None or not strength_max
    samples: list[torch.Tensor] = []
    noises: list[torch.Tensor] = []
    masked: list[torch.Tensor] = []
    for generator in generators:
        if sample_image:
            samples.append(image.sample(generator))
        noises.append(torch.randn(image.mean.shape, generator=generator, dtype=image.mean.dtype))
        if masked_image is not None:
            masked.append(masked_image.sample(generator))
    noise = torch.cat(noises)
    image_latents = torch.cat(samples) if samples else None
    first = timesteps[:1].repeat(len(generators))
    latents = noise * scheduler.init_noise_sigma if strength_max else scheduler.add_noise(image_latents, noise, first)
    if inpaint_mask is None:
        return latents, None, None
    if masked_image is not None:
        conditioning = torch.cat([inpaint_mask.expand(len(generators), -1, -1, -1), torch.cat(masked)], dim=1)
        return latents, None, conditioning
    assert image_latents is not None  # 4-channel inpainting always samples the image (sample_image)
    return latents, InpaintState(image_latents, noise, inpaint_mask), None


def latent_mask(mask: torch.Tensor, latent_shape: tuple[int, int]) -> torch.Tensor:
    """A binarised pixel mask [1, 1, H, W] in {0, 1} -> the latent grid (nearest, as diffusers)."""
    return torch.nn.functional.interpolate(mask, size=latent_shape)
