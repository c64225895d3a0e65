"""Stage 4: latents -> pixels -> PNG bytes (image -> latents for edits is a later issue)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deployments import models


def to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> NHWC uint8, with diffusers' VaeImageProcessor arithmetic."""
    images = (decoded / 2 + 0.5).clamp(0, 1)
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return (images * 255).round().astype("uint8")


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class VaeCodecEngine:
    def __init__(self, model_path: Path, num_threads: int | None = None):
        self.num_threads = num_threads
        self.vae = models.load_vae(Path(model_path))
        self.scaling_factor = self.vae.config.scaling_factor
        self._lock = threading.Lock()

    @torch.inference_mode()
    def decode_pixels(self, latents: torch.Tensor) -> np.ndarray:
        with self._lock:
            models.set_torch_threads(self.num_threads)
            decoded = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return to_uint8(decoded)

    def decode_png(self, latents: torch.Tensor) -> list[bytes]:
        return [encode_png(pixels) for pixels in self.decode_pixels(latents)]


def build_deployment():
    from ray import serve

    from deployments.serial_executor import SerialExecutor

    @serve.deployment(name="VaeCodec", ray_actor_options={"num_cpus": 0.2})
    class VaeCodec:
        def __init__(self, model_path: str, num_threads: int | None = None):
            self.engine = VaeCodecEngine(Path(model_path), num_threads)
            self.executor = SerialExecutor("vae-codec")

        async def decode_png(self, latents: torch.Tensor) -> list[bytes]:
            return await self.executor.run(self.engine.decode_png, latents)

    return VaeCodec
